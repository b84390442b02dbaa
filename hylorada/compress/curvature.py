"""Output-side curvature for method="fisher": the Gram of the loss gradients at each layer's output.

Second-order model of the calibration loss (K-FAC, Martens & Grosse 2015). For y = W x in a
network with loss ℓ, changing W by E changes the loss by about ½ vec(E)ᵀ H vec(E) (the
gradient term vanishes in expectation under the model's own predictive distribution), and the
Fisher / Gauss–Newton block of W factorises as H ≈ N · (G ⊗ F), with

    G = Σ_t x_t x_tᵀ / N   (inputs: the whitening's Gram, hylorada/compress/whiten.py)
    F = Σ_t δ_t δ_tᵀ / N   (δ_t = ∂ℓ/∂y_t, ℓ = Σ_t −log p(ŷ_t | ...), ŷ_t ~ p(· | ...)),

so Δℓ ≈ ½ N tr(F E G Eᵀ) = ½ N ||Rᵀ E L||_F² for R Rᵀ = F, L Lᵀ = G. The best rank-k
replacement under this model is the truncated SVD of Rᵀ W L, mapped back by R⁻ᵀ on the left
and L⁻¹ on the right, and its predicted loss increase is ½ N Σ_{j>k} s_j² of Rᵀ W L: in loss
units for every matrix of the model, so one budget can be spent across all of them by s²
per parameter (allocate="loss" with absolute energies, hylorada/compress/allocate.py).

The labels ŷ are sampled from the model's own next-token distribution (one sample per
position, a seeded generator), which makes E[δδᵀ] the true Fisher (= the Gauss–Newton matrix
of the softmax cross-entropy) rather than the "empirical Fisher" of the text's next tokens.
Positions with attention_mask 0 take no label and are left out of F.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .whiten import Gram, model_batches


def sampled_label_loss(logits: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Σ_t −log p(ŷ_t) over the unmasked positions, ŷ_t ~ softmax(logits_t) (float32), sampled on
    the logits' device (`generator` must be of that device: no copy of the probabilities)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        probs = logp.exp().reshape(-1, logp.shape[-1])
        y = torch.multinomial(probs, 1, generator=generator).reshape(logp.shape[:-1])
    nll = -logp.gather(-1, y[..., None]).squeeze(-1)
    return nll.sum() if mask is None else (nll * mask.to(nll.dtype)).sum()


class OutputGramCollector:
    """Forward hooks on `modules` that register a gradient hook on each output; the hook adds
    δᵀδ (δ = the gradient of the output, masked positions dropped) to the module's sum in
    float64. Use as a context manager around forward + backward passes; `set_mask` first."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        self._mask = mask

    def _forward_hook(self, name: str):
        def hook(module, args, out):
            keep = None if self._mask is None else self._mask.reshape(-1).bool()

            def grad_hook(grad: torch.Tensor) -> None:
                d = grad.reshape(-1, grad.shape[-1])
                if keep is not None:
                    d = d[keep]
                d = d.double()
                self.sums[name] = self.sums.get(name, 0) + d.mT @ d
                self.counts[name] = self.counts.get(name, 0) + d.shape[0]
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    def __enter__(self) -> "OutputGramCollector":
        self._handles = [m.register_forward_hook(self._forward_hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def grams(self) -> dict[str, Gram]:
        return {n: Gram(self.sums[n] / max(self.counts[n], 1), self.counts[n]) for n in self.sums}


def collect_output_grams(model: nn.Module, modules: Mapping[str, nn.Module], calibration,
                         batch_size: int = 4, n_blocks: int | None = None, seq_len: int | None = None,
                         seed: int = 0, progress: bool = False) -> dict[str, Gram]:
    """F = Σ δδᵀ / N for every module in `modules` (module docstring): one forward and one
    backward per calibration batch (eval mode, parameters untouched: the gradient flows from
    the embeddings' output, made a leaf that requires grad)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    embed = model.get_input_embeddings()
    leaf = embed.register_forward_hook(lambda m, a, out: out.detach().requires_grad_(True))
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # no parameter gradient is computed, stored or left behind
        p.requires_grad_(False)
    model.eval()
    try:
        with OutputGramCollector(modules) as collector, torch.enable_grad():
            for kwargs, mask in model_batches(model, calibration, batch_size, n_blocks, seq_len, progress, "curvature"):
                collector.set_mask(mask)
                logits = model(**kwargs).logits
                sampled_label_loss(logits, mask, generator).backward()
        return collector.grams()
    finally:
        leaf.remove()
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
