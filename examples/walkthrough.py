# %% [markdown]
# # microdreamer walkthrough
#
# A notebook as a plain Python file: each `# %%` line starts a cell (VS Code, PyCharm and Jupytext open it
# as a notebook; `python examples/walkthrough.py [--quick]` runs it top to bottom). It runs on the CPU with the
# reference teacher, which renders a ground-truth mesh where a real run would call a diffusion model.

# %% Settings: a preset with overrides, under the command line's option names
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import microdreamer
from microdreamer import Pipeline, Progress, UserError

SPOT = Path(microdreamer.__file__).parent / "assets" / "spot" / "spot.obj"
QUICK = "--quick" in sys.argv
OUT = Path("out/walkthrough")
# --quick: a smoke test in seconds (a few hundred Gaussians, tiny renders), not a useful result
settings = dict(iters=1, steps=2, views=2, res=32, grid=32, faces=500, texture_size=64, refine_steps=1) if QUICK else {}
config = {"gaussians": {"num_points": 300}, "mesh": {"bake_resolution": 64, "refine_resolution": 32, "refine_views": 2}}
pipe = Pipeline.from_preset(teacher="reference", model=str(SPOT), seed=7, overrides=config if QUICK else None, **settings)
print(pipe.config.schedule)  # the resolved, typed configuration

# %% Bad input is a UserError with the same one-line message the command prints; nothing is loaded yet
try:
    pipe.image_to_3d("no-such-photo.png")
except UserError as error:
    print("refused:", error)

# %% Reconstruct, with progress through a callback (the CLI draws its progress bar from the same events)
def show(event: Progress) -> None:
    if event.stage == "sir":
        print(f"  iteration {event.done}/{event.total}: {event.info}")


result = pipe.image_to_3d(on_progress=show)
print(result.stem, result.model.num_primitives, "Gaussians")

# %% Look at it: the contact sheet and a short turntable, as arrays
OUT.mkdir(parents=True, exist_ok=True)
Image.fromarray(np.concatenate(list(result.views), axis=1)).save(OUT / "sheet.png")  # 8 views side by side
frames = result.turntable(frames=8, resolution=64)
print("turntable", frames.shape, frames.dtype)

# %% Score it against the ground truth on 16 held-out views, then save it
scores = result.evaluate(SPOT, resolution=64 if QUICK else 256)
print(f"held-out PSNR {scores.mean_psnr:.2f} dB")
report = result.save(OUT, overwrite=True)
print("wrote", ", ".join(report.outputs.values()))

# %% A textured mesh, its texture refined by the same teacher (loaded once)
mesh = pipe.to_mesh(result)
print("wrote", ", ".join(mesh.save(OUT, overwrite=True).outputs))
print(f"mesh PSNR {mesh.evaluate(SPOT, resolution=64 if QUICK else 256).mean_psnr:.2f} dB")
