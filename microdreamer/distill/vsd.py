"""Stage I losses: multi-view variational score distillation (GECO §3.1, Eq. 1–2).

For a generated sample x0 = G(θ; z, y) noised to x_t at a random t, the generator's gradient is

    ∇θ L_VSD = E_{t,ε}[ w(t) · (ε_teacher(x_t; y, t) − ε_student(x_t; y, t)) · ∂x0/∂θ ]     (Eq. 1)

with the frozen teacher guided (scale 4) and the online student unguided. The student learns the score of the
generator's samples with the denoising loss ‖ε_student(x_t; y, t) − ε‖² (Eq. 2).

:func:`generator_surrogate` is the scalar whose gradient is exactly Eq. 1's (averaged over the batch): the
linear form mean_b ⟨x0_b, sg(g_b)⟩ with g = w(t)(ε_teacher − ε_student); its value means nothing, so training
logs :func:`vsd_magnitude`, 0.5·mean_b ‖g_b‖² (the value of the equivalent 0.5·‖x0 − sg(x0 − g)‖², whose
gradient is g only up to the rounding of x0 − (x0 − g)).

w(t) is not given by GECO; the choices (:data:`WEIGHTINGS`):

- ``dmd`` (default): DMD's normalisation. DMD moves x0 along x0_student − x0_teacher divided by the mean
  absolute distance |x0 − x0_teacher| over each sample's elements; with x0_pred = (x_t − √(1−ᾱ)ε)/√ᾱ this is
  w(t) = √((1−ᾱ_t)/ᾱ_t) / mean|x0 − x0_teacher|. It keeps the gradient's scale the same at every t.
- ``sds``: w(t) = 1 − ᾱ_t, DreamFusion's and ProlificDreamer's weighting.
- ``constant``: w(t) = 1.
"""

from __future__ import annotations

from torch import Tensor

WEIGHTINGS: tuple[str, ...] = ("dmd", "sds", "constant")


def vsd_weight(weighting: str, alpha: Tensor, x0: Tensor, x0_teacher: Tensor) -> Tensor:
    """w(t) per sample, shaped like ``alpha`` ``[B,1,…]`` (``x0``, ``x0_teacher``: the generated sample and
    the teacher's prediction of it from x_t, used by ``dmd``)."""
    if weighting == "dmd":
        distance = (x0.detach() - x0_teacher).abs().flatten(1).mean(1).view_as(alpha)
        return ((1 - alpha) / alpha).sqrt() / distance.clamp_min(1e-12)
    if weighting == "sds":
        return 1 - alpha
    if weighting == "constant":
        return alpha.new_ones(alpha.shape)
    raise ValueError(f"unknown VSD weighting {weighting!r} (use {', '.join(WEIGHTINGS)})")


def vsd_direction(weight: Tensor, eps_teacher: Tensor, eps_student: Tensor) -> Tensor:
    """g = w(t)·(ε_teacher − ε_student), the per-element gradient Eq. 1 sends into x0."""
    return weight * (eps_teacher - eps_student)


def generator_surrogate(x0: Tensor, direction: Tensor) -> Tensor:
    """mean_b ⟨x0_b, sg(g_b)⟩: its gradient is mean_b g_b·∂x0_b/∂θ, exactly (Eq. 1's batch estimate)."""
    return (x0 * direction.detach()).flatten(1).sum(1).mean()


def vsd_magnitude(direction: Tensor) -> Tensor:
    """0.5·mean_b ‖g_b‖², the logged generator loss (see the module docstring)."""
    return 0.5 * direction.detach().square().flatten(1).sum(1).mean()


def student_loss(eps_student: Tensor, noise: Tensor) -> Tensor:
    """‖ε_student − ε‖², averaged over all elements (Eq. 2)."""
    return (eps_student - noise).square().mean()
