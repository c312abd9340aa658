"""The MVDream / ImageDream multi-view UNet and its camera input (spec §2.3–2.7, §3.3–3.5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from microdreamer.errors import UserError
from microdreamer.sir.cameras import Cameras
from microdreamer.teachers.mv_cameras import FRONT_AZIMUTH, get_camera, mvdream_camera, with_reference_frame
from microdreamer.teachers.mv_unet import (
    Attention,
    BasicTransformerBlock3D,
    MultiViewUNet,
    MultiViewUNetConfig,
    Resampler,
    timestep_embedding,
)
from tolerances import EPS32, assert_within, network_bound, rounding_bound, to_float64

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks

#: a camera pose from degrees in float32: radians, sin/cos, look-at cross products and three
#: normalisations of 3-vectors, about 12 dependent roundings of unit-length values
POSE_BOUND = rounding_bound(1.0, n=3, ops=12)

# unet/config.json of ashawkey/mvdream-sd2.1-diffusers (spec §2.2); ImageDream adds "ip_dim": 16 (§3.1)
MVDREAM_JSON = {
    "_class_name": "MultiViewUNetModel", "_diffusers_version": "0.25.0", "image_size": 32, "in_channels": 4,
    "out_channels": 4, "model_channels": 320, "num_res_blocks": 2, "attention_resolutions": [4, 2, 1],
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "context_dim": 1024, "transformer_depth": 1,
    "camera_dim": 16,
}
IMAGEDREAM_JSON = {**MVDREAM_JSON, "ip_dim": 16}

TINY = MultiViewUNetConfig(
    model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_head_channels=16, context_dim=32,
)
TINY_IP = MultiViewUNetConfig(
    model_channels=32, channel_mult=(1, 2), attention_resolutions=(1, 2), num_head_channels=16, context_dim=32,
    ip_dim=4, ip_embedding_dim=24, ip_resampler_depth=2, ip_resampler_heads=2, ip_resampler_head_dim=8,
)


# ---------------------------------------------------------------------------------------------------------
# Expected state dict, written from the spec's tables (§2.3, §3.3, §3.4), independent of the model code.

def _res(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    keys = {
        f"{p}.in_layers.0.weight": (cin,), f"{p}.in_layers.0.bias": (cin,),
        f"{p}.in_layers.2.weight": (cout, cin, 3, 3), f"{p}.in_layers.2.bias": (cout,),
        f"{p}.emb_layers.1.weight": (cout, 1280), f"{p}.emb_layers.1.bias": (cout,),
        f"{p}.out_layers.0.weight": (cout,), f"{p}.out_layers.0.bias": (cout,),
        f"{p}.out_layers.3.weight": (cout, cout, 3, 3), f"{p}.out_layers.3.bias": (cout,),
    }
    if cin != cout:
        keys |= {f"{p}.skip_connection.weight": (cout, cin, 1, 1), f"{p}.skip_connection.bias": (cout,)}
    return keys


def _st(p: str, c: int, ip: bool) -> dict[str, tuple[int, ...]]:
    b = f"{p}.transformer_blocks.0"
    keys = {
        f"{p}.norm.weight": (c,), f"{p}.norm.bias": (c,),
        f"{p}.proj_in.weight": (c, c), f"{p}.proj_in.bias": (c,),
        f"{p}.proj_out.weight": (c, c), f"{p}.proj_out.bias": (c,),
        f"{b}.attn1.to_q.weight": (c, c), f"{b}.attn1.to_k.weight": (c, c), f"{b}.attn1.to_v.weight": (c, c),
        f"{b}.attn1.to_out.0.weight": (c, c), f"{b}.attn1.to_out.0.bias": (c,),
        f"{b}.attn2.to_q.weight": (c, c), f"{b}.attn2.to_k.weight": (c, 1024), f"{b}.attn2.to_v.weight": (c, 1024),
        f"{b}.attn2.to_out.0.weight": (c, c), f"{b}.attn2.to_out.0.bias": (c,),
        f"{b}.ff.net.0.proj.weight": (8 * c, c), f"{b}.ff.net.0.proj.bias": (8 * c,),
        f"{b}.ff.net.2.weight": (c, 4 * c), f"{b}.ff.net.2.bias": (c,),
    }
    for n in (1, 2, 3):
        keys |= {f"{b}.norm{n}.weight": (c,), f"{b}.norm{n}.bias": (c,)}
    if ip:
        keys |= {f"{b}.attn2.to_k_ip.weight": (c, 1024), f"{b}.attn2.to_v_ip.weight": (c, 1024)}
    return keys


def _linear(p: str, cin: int, cout: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.weight": (cout, cin), f"{p}.bias": (cout,)}


def _layernorm(p: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{p}.weight": (c,), f"{p}.bias": (c,)}


def expected_state_dict(ip: bool) -> dict[str, tuple[int, ...]]:
    keys = _linear("time_embed.0", 320, 1280) | _linear("time_embed.2", 1280, 1280)
    keys |= _linear("camera_embed.0", 16, 1280) | _linear("camera_embed.2", 1280, 1280)
    keys |= {"input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.0.0.bias": (320,)}
    # input blocks: (index, res in, res out, has transformer) and downsamplers
    for i, cin, cout, attn in [(1, 320, 320, 1), (2, 320, 320, 1), (4, 320, 640, 1), (5, 640, 640, 1),
                               (7, 640, 1280, 1), (8, 1280, 1280, 1), (10, 1280, 1280, 0), (11, 1280, 1280, 0)]:
        keys |= _res(f"input_blocks.{i}.0", cin, cout) | (_st(f"input_blocks.{i}.1", cout, ip) if attn else {})
    for i, c in [(3, 320), (6, 640), (9, 1280)]:
        keys |= {f"input_blocks.{i}.0.op.weight": (c, c, 3, 3), f"input_blocks.{i}.0.op.bias": (c,)}
    keys |= _res("middle_block.0", 1280, 1280) | _st("middle_block.1", 1280, ip) | _res("middle_block.2", 1280, 1280)
    # output blocks: (index, res in, res out, has transformer, upsample sub-index or None)
    for i, cin, cout, attn, up in [
        (0, 2560, 1280, 0, None), (1, 2560, 1280, 0, None), (2, 2560, 1280, 0, 1),
        (3, 2560, 1280, 1, None), (4, 2560, 1280, 1, None), (5, 1920, 1280, 1, 2),
        (6, 1920, 640, 1, None), (7, 1280, 640, 1, None), (8, 960, 640, 1, 2),
        (9, 960, 320, 1, None), (10, 640, 320, 1, None), (11, 640, 320, 1, None),
    ]:
        keys |= _res(f"output_blocks.{i}.0", cin, cout) | (_st(f"output_blocks.{i}.1", cout, ip) if attn else {})
        if up is not None:
            keys |= {f"output_blocks.{i}.{up}.conv.weight": (cout, cout, 3, 3), f"output_blocks.{i}.{up}.conv.bias": (cout,)}
    keys |= {"out.0.weight": (320,), "out.0.bias": (320,), "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,)}
    if ip:
        keys |= {"image_embed.latents": (1, 16, 1024)}
        keys |= _linear("image_embed.proj_in", 1280, 1024) | _linear("image_embed.proj_out", 1024, 1024)
        keys |= _layernorm("image_embed.norm_out", 1024)
        for layer in range(4):
            p = f"image_embed.layers.{layer}"
            keys |= _layernorm(f"{p}.0.norm1", 1024) | _layernorm(f"{p}.0.norm2", 1024) | _layernorm(f"{p}.1.0", 1024)
            keys |= {f"{p}.0.to_q.weight": (768, 1024), f"{p}.0.to_kv.weight": (1536, 1024),
                     f"{p}.0.to_out.weight": (1024, 768), f"{p}.1.1.weight": (4096, 1024), f"{p}.1.3.weight": (1024, 4096)}
    return keys


@pytest.mark.parametrize("config_json, tensors, params", [
    (MVDREAM_JSON, 690, 867_572_164),
    (IMAGEDREAM_JSON, 773, 941_672_900),
])
def test_real_configs_match_checkpoint_manifest(config_json, tensors, params):
    expected = expected_state_dict(ip="ip_dim" in config_json)
    assert len(expected) == tensors and sum(math.prod(s) for s in expected.values()) == params  # spec tables
    with torch.device("meta"):
        model = MultiViewUNet(MultiViewUNetConfig.from_dict(config_json))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(got.keys() - expected.keys()) == [] and sorted(expected.keys() - got.keys()) == []
    assert {k: s for k, s in got.items() if s != expected[k]} == {}
    assert sum(p.numel() for p in model.parameters()) == params
    # spot checks quoted in the spec
    assert got["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    assert got["output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)
    assert got["camera_embed.0.weight"] == (1280, 16)
    if "ip_dim" in config_json:
        assert got["image_embed.layers.0.0.to_kv.weight"] == (1536, 1024)
        assert got["middle_block.1.transformer_blocks.0.attn2.to_k_ip.weight"] == (1280, 1024)
    else:
        assert not any("_ip" in k or k.startswith("image_embed") for k in got)


def test_config_rejects_unknown_keys():
    assert MultiViewUNetConfig.from_dict({**MVDREAM_JSON, "use_checkpoint": False}).channel_mult == (1, 2, 4, 4)
    with pytest.raises(UserError, match="use_fp16"):
        MultiViewUNetConfig.from_dict({**MVDREAM_JSON, "use_fp16": True})


# ---------------------------------------------------------------------------------------------------------
# Tiny models with deterministic random weights

def randomized(config: MultiViewUNetConfig, seed: int = 0) -> MultiViewUNet:
    """Build on meta and fill every tensor from a seeded generator (weights ~ 1/sqrt(fan_in))."""
    with torch.device("meta"):
        model = MultiViewUNet(config)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("latents"):
                p.copy_(noise)
            elif p.dim() > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def tiny_inputs(config: MultiViewUNetConfig, objects: int, frames: int, seed: int = 1, size: int = 8) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = objects * frames
    inputs = {
        "x": torch.randn(n, 4, size, size, generator=g),
        "timesteps": torch.randint(0, 1000, (n,), generator=g),
        "context": torch.randn(n, 7, config.context_dim, generator=g),
        "camera": torch.randn(n, 16, generator=g),
        "num_frames": frames,
    }
    if config.ip_dim:
        inputs["ip"] = torch.randn(n, 5, config.ip_embedding_dim, generator=g)
        inputs["ip_img"] = torch.randn(objects, 4, size, size, generator=g)
    return inputs


@torch.no_grad()
def test_views_are_permutation_equivariant_and_coupled():
    model = randomized(TINY).double()  # structure, checked in float64 (any float32 path rounds otherwise)
    inputs = to_float64(tiny_inputs(TINY, objects=2, frames=4))
    out = model(**inputs)
    assert out.shape == (8, 4, 8, 8) and torch.isfinite(out).all()

    perm = torch.tensor([2, 0, 3, 1, 5, 7, 4, 6])  # views permuted within each object
    permuted = {k: (v[perm] if torch.is_tensor(v) else v) for k, v in inputs.items()}
    bound = 2 * network_bound(out.abs().max().item(), model, dtype=torch.float64)
    assert_within(model(**permuted), out[perm], bound, "permuted views")

    changed = {**inputs, "x": inputs["x"].clone()}
    changed["x"][0] += 1.0  # view 0 of object 0
    diff = (model(**changed) - out).abs().flatten(1).amax(1)
    assert (diff[1:4] > 1e-3).all()  # the other views of that object see it through joint attention
    assert (diff[4:] == 0).all()  # the other object does not

    single = model(**{**inputs, "num_frames": 1})  # without coupling the views give other results
    assert (single - out).abs().max() > 1e-3


def _embedding_bound(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Elementwise float32 error bound of ``[cos, sin](t·exp(−ln(10⁴)·i/half))``: the exponent ``x`` is
    off by 2 roundings of ``|x|``, which ``exp`` turns into a relative error ``2u|x|`` of the frequency
    (+ one rounding of its own), the product adds one more; ``cos``/``sin`` add one rounding of 1."""
    u, half = EPS32 / 2, dim // 2
    x = math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half
    args = t[:, None].double() * torch.exp(-x)
    per_arg = u * (args.abs() * (2 * x + 3) + 1)
    return torch.cat([per_arg, per_arg], 1)


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 1, 37, 999])
    emb = timestep_embedding(t, 8)
    freqs = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    args = t[:, None].double() * freqs
    assert ((emb.double() - torch.cat([args.cos(), args.sin()], 1)).abs() <= _embedding_bound(t, 8)).all()

    model = randomized(TINY)  # and the network feeds exactly that to time_embed
    seen = []
    model.time_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        model(**tiny_inputs(TINY, objects=1, frames=4))
    from diffusers.models.embeddings import get_timestep_embedding

    ts = tiny_inputs(TINY, objects=1, frames=4)["timesteps"]
    ref = get_timestep_embedding(ts, 32, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert ((seen[0].double() - ref.double()).abs() <= 2 * _embedding_bound(ts, 32)).all()  # both float32


def _to_diffusers_name(name: str, config: MultiViewUNetConfig) -> str:
    """Our (LDM) parameter names → diffusers UNet2DConditionModel names for a model with attention everywhere."""
    res = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
           "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
    parts = name.split(".")
    top = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "camera_embed.0": "class_embedding.linear_1", "camera_embed.2": "class_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    head = ".".join(parts[:3]) if parts[0] in ("input_blocks", "output_blocks") else ".".join(parts[:2])
    if ".".join(parts[:2]) in top:
        return top[".".join(parts[:2])] + "." + parts[-1]
    if head in top:
        return top[head] + "." + parts[-1]
    per_level = config.num_res_blocks + 1
    if parts[0] == "middle_block":
        index, sub, rest = None, int(parts[1]), parts[2:]
        prefix = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}[sub]
    else:
        index, sub, rest = int(parts[1]), int(parts[2]), parts[3:]
        if parts[0] == "input_blocks":
            level, i = divmod(index - 1, per_level)
            prefix = f"down_blocks.{level}.downsamplers.0" if i == config.num_res_blocks else \
                f"down_blocks.{level}.{'resnets' if sub == 0 else 'attentions'}.{i}"
            rest = ["conv"] + rest[1:] if rest[0] == "op" else rest
        else:
            level, i = divmod(index, per_level)
            prefix = f"up_blocks.{level}.upsamplers.0" if rest[0] == "conv" else \
                f"up_blocks.{level}.{'resnets' if sub == 0 else 'attentions'}.{i}"
    rest_name = ".".join(rest)
    if prefix.split(".")[-2] == "resnets":
        for ours, theirs in res.items():
            if rest_name.startswith(ours):
                rest_name = theirs + rest_name[len(ours):]
    return f"{prefix}.{rest_name}"


@torch.no_grad()
def test_single_view_matches_diffusers_unet():
    """With one frame the network is an SD-2.1 UNet + camera ("projection" class) embedding: compare to diffusers."""
    from diffusers import UNet2DConditionModel

    model = randomized(TINY).double()  # both in float64: the comparison is of structure, not rounding
    ref = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, use_linear_projection=True, flip_sin_to_cos=True,
        freq_shift=0, class_embed_type="projection", projection_class_embeddings_input_dim=16,
    ).eval().double()
    converted = {_to_diffusers_name(k, TINY): v for k, v in model.state_dict().items()}
    ref.load_state_dict(converted, strict=True)
    inputs = to_float64(tiny_inputs(TINY, objects=3, frames=1))
    ours = model(**inputs)
    theirs = ref(inputs["x"], inputs["timesteps"], inputs["context"], class_labels=inputs["camera"]).sample
    bound = 2 * network_bound(theirs.abs().max().item(), model, dtype=torch.float64)
    assert_within(ours, theirs, bound, "ours vs diffusers")


@torch.no_grad()
def test_joint_self_attention_brute_force():
    g = torch.Generator().manual_seed(3)
    block = BasicTransformerBlock3D(dim=8, heads=2, head_dim=4, context_dim=6, ip_dim=0, ip_weight=1.0).double()
    for p in block.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(2 * 3, 5, 8, generator=g, dtype=torch.float64)  # 2 objects x 3 frames, 5 tokens each
    ctx = torch.randn(6, 4, 6, generator=g, dtype=torch.float64)

    def attend(attn, q_in, kv_in):
        q, k, v = attn.to_q(q_in), attn.to_k(kv_in), attn.to_v(kv_in)
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            w = torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / 2.0, -1)
            heads.append(w @ v[..., s])
        return attn.to_out(torch.cat(heads, -1))

    joint = x.reshape(2, 15, 8)
    h = (attend(block.attn1, block.norm1(joint), block.norm1(joint)) + joint).reshape(6, 5, 8)
    h = attend(block.attn2, block.norm2(h), ctx) + h
    a, gate = block.ff.net[0].proj(block.norm3(h)).chunk(2, -1)
    expected = block.ff.net[2](a * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))) + h
    bound = 2 * network_bound(expected.abs().max().item(), block, dtype=torch.float64)
    assert_within(block(x, ctx, num_frames=3), expected, bound, "joint attention block")


@torch.no_grad()
def test_decoupled_image_attention_brute_force():
    g = torch.Generator().manual_seed(4)
    attn = Attention(8, 6, heads=2, head_dim=4, ip_dim=3, ip_weight=0.7).double()
    for p in attn.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x, ctx = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(2, 4 + 3, 6, generator=g, dtype=torch.float64)

    def sdpa(q, k, v):
        return torch.cat([torch.softmax(q[..., s] @ k[..., s].transpose(-1, -2) / 2.0, -1) @ v[..., s]
                          for s in (slice(0, 4), slice(4, 8))], -1)

    q = attn.to_q(x)
    text = sdpa(q, attn.to_k(ctx[:, :4]), attn.to_v(ctx[:, :4]))  # separate softmax over text and image tokens
    image = sdpa(q, attn.to_k_ip(ctx[:, 4:]), attn.to_v_ip(ctx[:, 4:]))
    expected = attn.to_out(text + 0.7 * image)
    bound = 2 * network_bound(expected.abs().max().item(), attn, dtype=torch.float64)
    assert_within(attn(x, ctx), expected, bound, "decoupled image attention")


@torch.no_grad()
def test_resampler_brute_force():
    g = torch.Generator().manual_seed(5)
    r = Resampler(dim=8, depth=2, head_dim=4, heads=2, num_queries=3, embedding_dim=6, output_dim=10).double()
    for p in r.parameters():
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    feats = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    x = r.proj_in(feats)
    lat = r.latents.repeat(2, 1, 1)
    for attn, ff in r.layers:
        a, b = attn.norm1(x), attn.norm2(lat)
        q = attn.to_q(b)
        k, v = attn.to_kv(torch.cat([a, b], 1)).chunk(2, -1)
        scale = 4 ** -0.25  # q and k both pre-scaled by dim_head^(-1/4)
        out = torch.cat([torch.softmax((q[..., s] * scale) @ (k[..., s] * scale).transpose(-1, -2), -1) @ v[..., s]
                         for s in (slice(0, 4), slice(4, 8))], -1)
        lat = attn.to_out(out) + lat
        lat = ff(lat) + lat
    expected = r.norm_out(r.proj_out(lat))
    assert_within(r(feats), expected, 2 * network_bound(expected.abs().max().item(), r, dtype=torch.float64), "resampler")


@torch.no_grad()
def test_imagedream_reference_frame_is_overwritten_by_ip_img():
    model = randomized(TINY_IP)
    inputs = tiny_inputs(TINY_IP, objects=2, frames=5)
    x_before = inputs["x"].clone()
    out = model(**inputs)
    assert torch.equal(inputs["x"], x_before)  # the caller's tensor is not modified

    other = inputs["x"].clone()
    other[4::5] = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9)) * 10
    assert torch.equal(model(**{**inputs, "x": other}), out)  # the 5th view input is ignored

    other_img = inputs["ip_img"].clone()
    other_img[0] += 1.0
    diff = (model(**{**inputs, "ip_img": other_img}) - out).abs().flatten(1).amax(1)
    assert (diff[:5] > 1e-3).all() and (diff[5:] == 0).all()  # reference latent reaches its own object only

    zero_ip = model(**{**inputs, "ip": torch.zeros_like(inputs["ip"])})
    assert (zero_ip - out).abs().max() > 1e-3  # image tokens matter
    with pytest.raises(ValueError, match="ip_img"):
        model(**{**inputs, "ip_img": None})


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    model = randomized(TINY_IP)
    config = {"_class_name": "MultiViewUNetModel", **{k: v for k, v in vars(TINY_IP).items()}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = MultiViewUNet.from_folder(tmp_path)
    assert loaded.config == TINY_IP
    inputs = tiny_inputs(TINY_IP, objects=1, frames=5)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs), model(**inputs))

    save_file({k: v for k, v in state.items() if k != "out.2.bias"}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"missing keys 'out\.2\.bias'"):
        MultiViewUNet.from_folder(tmp_path)
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"unexpected keys 'extra\.weight'"):
        MultiViewUNet.from_folder(tmp_path)
    save_file({**state, "out.2.bias": torch.zeros(5)}, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(UserError, match=r"key 'out\.2\.bias' has shape \[5\]"):
        MultiViewUNet.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Camera input (spec §2.7)

def test_camera_worked_examples():
    cams = Cameras.orbit([0.0, 0.0], [0.0, 90.0], 2.5, 64)
    got = mvdream_camera(cams).reshape(2, 4, 4)
    az0 = torch.tensor([[1, 0, 0, 0], [0, 0, -1, -1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    az90 = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    assert_within(got[0], az0, POSE_BOUND, "azimuth 0")
    assert_within(got[1], az90, POSE_BOUND, "azimuth 90")
    assert FRONT_AZIMUTH == 90.0


def _mvdream_reference_pose(elevation: float, azimuth: float) -> np.ndarray:
    """MVDream's look-at in its own sign (positive elevation = above), then the Blender conversion."""
    el, az = np.radians(elevation), np.radians(azimuth)
    pos = np.array([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)])
    fwd = -pos / np.linalg.norm(pos)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, up / np.linalg.norm(up), -fwd], 1)
    pose[:3, 3] = pos
    return np.stack([pose[0], -pose[2], pose[1], pose[3]])


def test_get_camera_matches_mvdream_formula_and_rendered_views():
    cams = get_camera(4, elevation=15.0, azimuth_start=30.0, extra_view=True)
    assert cams.shape == (5, 16) and torch.equal(cams[4], torch.zeros(16))
    for i in range(4):
        ref = _mvdream_reference_pose(15.0, 30.0 + 90.0 * i).reshape(16)
        assert_within(cams[i], torch.from_numpy(ref), POSE_BOUND, f"view {i}")
    # a rendered view at radius 3 and elevation −15 (above, spec §0.4) gets the same input
    rendered = mvdream_camera(Cameras.orbit([-15.0] * 4, [30.0 + 90.0 * i for i in range(4)], 3.0, 64))
    assert_within(rendered, cams[:4], 2 * POSE_BOUND, "rendered views")  # both float32 poses


def test_with_reference_frame():
    cams = torch.arange(2 * 4 * 16, dtype=torch.float32).reshape(8, 16)
    out = with_reference_frame(cams, views=4)
    assert out.shape == (10, 16)
    assert torch.equal(out[[0, 1, 2, 3, 5, 6, 7, 8]], cams)
    assert torch.equal(out[[4, 9]], torch.zeros(2, 16))
