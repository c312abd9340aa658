"""Reference ("reference-only") attention: the self-attention layers of a diffusers UNet also attend to the
tokens of a reference image (Zero123++'s local conditioning, spec §4.4).

A conditioned UNet call is two passes at the same timestep. The *write* pass runs the UNet on the reference
latent and records the input of every self-attention layer (``attn1`` of each transformer block, i.e. the
normalised hidden states); the *read* pass runs it on the sample, and each self-attention layer takes its
keys and values from [its own tokens ; the recorded reference tokens] (concatenated along the tokens, batch
element by batch element) while the queries stay its own. Cross-attention layers are untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

Mode = Literal["off", "write", "read"]


class ReferenceBank:
    """The reference tokens recorded per self-attention layer, and what the layers do with them now."""

    def __init__(self) -> None:
        self.mode: Mode = "off"
        self.tokens: dict[str, Tensor] = {}

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Inside: every self-attention layer records its input (and attends as usual)."""
        self.tokens.clear()
        self.mode = "write"
        try:
            yield
        finally:
            self.mode = "off"

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Inside: every self-attention layer attends to its own and the recorded tokens; they are
        dropped on leaving."""
        self.mode = "read"
        try:
            yield
        finally:
            self.mode = "off"
            self.tokens.clear()


class ReferenceAttnProcessor:
    """A self-attention processor that writes to or reads from a :class:`ReferenceBank`, then runs the
    layer's own processor (``inner``) with the resulting keys/values source."""

    def __init__(self, name: str, bank: ReferenceBank, inner: Any) -> None:
        self.name, self.bank, self.inner = name, bank, inner

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        if self.bank.mode == "write":
            self.bank.tokens[self.name] = hidden_states
        elif self.bank.mode == "read":
            reference = self.bank.tokens.get(self.name)
            if reference is None:
                raise RuntimeError(f"no reference tokens recorded for {self.name}: run the write pass first")
            if reference.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"{self.name}: {reference.shape[0]} reference batch elements for {hidden_states.shape[0]} samples"
                )
            encoder_hidden_states = torch.cat([hidden_states, reference.to(hidden_states.dtype)], dim=1)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def reference_bank(unet: nn.Module) -> ReferenceBank:
    """The bank that drives ``unet``'s reference attention (e.g. of a deep copy of an installed UNet)."""
    banks = {id(p.bank): p.bank for p in unet.attn_processors.values() if isinstance(p, ReferenceAttnProcessor)}
    if len(banks) != 1:
        raise ValueError(f"{type(unet).__name__} has {len(banks)} reference banks installed, expected one")
    return next(iter(banks.values()))


def reference_call(
    unet: nn.Module,
    bank: ReferenceBank,
    sample: Tensor,
    timestep: Tensor,
    context: Tensor,
    reference: Tensor,
    reference_timestep: Tensor,
) -> Tensor:
    """One conditioned UNet call: the write pass on ``reference`` at ``reference_timestep``, then the read
    pass on ``sample`` at ``timestep``; returns the read pass's output. Both passes share ``context``."""
    with bank.writing():
        unet(reference, reference_timestep, encoder_hidden_states=context)
    with bank.reading():
        return unet(sample, timestep, encoder_hidden_states=context).sample


def install_reference_attention(unet: nn.Module) -> ReferenceBank:
    """Wrap the processor of every transformer-block self-attention (``…attn1``) of ``unet`` and return the
    bank that drives them (mode ``off``: the UNet behaves as before)."""
    from diffusers.models.attention_processor import Attention

    bank = ReferenceBank()
    layers = [(n, m) for n, m in unet.named_modules() if n.endswith(".attn1") and isinstance(m, Attention)]
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no transformer self-attention layers (attn1)")
    for name, layer in layers:
        layer.set_processor(ReferenceAttnProcessor(name, bank, layer.processor))
    return bank
