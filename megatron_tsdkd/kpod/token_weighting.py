"""The keypoint token-weighting module of KPOD (METHOD.md KPOD 1), trained once and frozen before distillation.

    e   = LayerNorm(E + SelfAttention(E)),   E = Emb(r) (the student's frozen input embedding)
    w_j = sigmoid(MLP(e_j))                   (2 layers, ReLU): the probability that token j is kept
    m_j = sigmoid((logit(w_j) + g1 - g0) / tau_g),  g ~ Gumbel(0, 1); hard 0/1 forward, soft gradient
    r[m]_j = m_j Emb(r_j) + (1 - m_j) mask_embedding
    L_p = - sum_k (|r| / n_k) sum_j log P(y_j | y_<j, r[m]_<k, x)     (a few prefix lengths k per example)
    L_m = sum_j m_j;   L = L_p + alpha_m L_m

The predictor first learns on unmasked rationales (warmup), then a token the answer needs must stay unmasked to keep L_p low; every other token is pushed to m = 0 by L_m, so w
ends high on keypoint tokens. The answer predictor is a small causal transformer over the same frozen embedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class WeightingConfig:
    hidden: int = 256            # MLP hidden width
    tau_g: float = 0.5           # Gumbel temperature
    alpha_m: float = 0.5         # weight of the mask-count penalty L_m
    prefixes: int = 2            # prefix lengths k sampled per example
    predictor_layers: int = 1
    steps: int = 200
    warmup_steps: int = 100      # first steps: nothing masked, only the predictor learns to read the rationale
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


class TokenWeighting(nn.Module):
    """Emb -> one self-attention layer (residual + LayerNorm) -> MLP -> sigmoid: w_j per rationale token."""

    def __init__(self, embedding: torch.Tensor, hidden: int = 256):
        super().__init__()
        dim = embedding.shape[1]
        self.embed = nn.Embedding.from_pretrained(embedding.detach().float().clone(), freeze=True)
        self.attention = nn.MultiheadAttention(dim, 1, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.constant_(self.mlp[2].bias, 3.0)   # start by keeping every token: the predictor first learns to
        # read the rationale, then L_m removes what it does not need (from w ~ 0 nothing could be learned)

    def logits(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        """logit(w) [B, L] for right-padded ``ids``; ``padding`` is True on padding."""
        e = self.embed(ids)
        attended, _ = self.attention(e, e, e, key_padding_mask=padding, need_weights=False)
        return self.mlp(self.norm(e + attended)).squeeze(-1)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(ids, padding))


class AnswerPredictor(nn.Module):
    """A small causal LM over the frozen embedding that reads (x, r[m]_<k) and scores y."""

    def __init__(self, embedding: nn.Embedding, layers: int, max_length: int = 1024):
        super().__init__()
        dim = embedding.embedding_dim
        self.embed = embedding
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.positions = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, 1, 4 * dim, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, embedding.num_embeddings)

    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        length = vectors.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=vectors.device)
        h = vectors + self.positions(torch.arange(length, device=vectors.device))
        return self.head(self.body(h, mask=causal, is_causal=True))


def _pad(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    padding = torch.ones(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
        padding[i, :len(r)] = False
    return ids, padding


def _relaxed_mask(logit_w: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand((2,) + logit_w.shape, generator=generator).clamp_(1e-9, 1 - 1e-9)
    g = -torch.log(-torch.log(u))
    soft = torch.sigmoid((logit_w + g[0] - g[1]) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()   # straight-through


def train_token_weighting(embedding: torch.Tensor, examples: Sequence[tuple[list, list, list]],
                          config: WeightingConfig = WeightingConfig()) -> TokenWeighting:
    """Train on (question ids, rationale ids, answer ids) triples; returns the frozen module (eval mode)."""
    examples = [e for e in examples if len(e[1]) and len(e[2])]
    if not examples:
        raise ValueError("token weighting needs examples with a non-empty rationale and answer")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    module = TokenWeighting(embedding, config.hidden)
    longest = max(len(x) + len(r) + len(y) for x, r, y in examples)
    predictor = AnswerPredictor(module.embed, config.predictor_layers, max_length=longest + 1)
    params = [p for p in list(module.parameters()) + list(predictor.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    order = torch.Generator().manual_seed(config.seed + 1)
    for step in range(config.warmup_steps + config.steps):
        warm = step < config.warmup_steps
        pick = torch.randint(len(examples), (min(config.batch_size, len(examples)),), generator=order).tolist()
        batch = [examples[i] for i in pick]
        r_ids, r_pad = _pad([r for _, r, _ in batch])
        m = _relaxed_mask(module.logits(r_ids, r_pad), config.tau_g, generator).masked_fill(r_pad, 0.0)
        if warm:
            m = (~r_pad).to(m.dtype)
        masked = m.unsqueeze(-1) * module.embed(r_ids) + (1 - m.unsqueeze(-1)) * predictor.mask_embedding
        rows, targets = [], []
        for b, (x, r, y) in enumerate(batch):
            for _ in range(config.prefixes):
                k = int(torch.randint(1, len(r) + 1, (1,), generator=order))
                x_e, y_e = module.embed(torch.tensor(x)), module.embed(torch.tensor(y))
                rows.append(torch.cat([x_e, masked[b, :k], y_e]))
                targets.append((len(x) + k - 1, list(y), len(r) / config.prefixes))
        width = max(v.shape[0] for v in rows)
        vectors = torch.stack([F.pad(v, (0, 0, 0, width - v.shape[0])) for v in rows])
        logits = predictor(vectors)
        log_probs = logits.log_softmax(-1)
        loss_p = 0.0
        for row, (first, y, scale) in enumerate(targets):
            positions = torch.arange(first, first + len(y))
            loss_p = loss_p - scale * log_probs[row, positions, torch.tensor(y)].sum()
        loss = (loss_p + (0.0 if warm else config.alpha_m) * m.sum()) / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


@torch.no_grad()
def token_weights(module: TokenWeighting, rationales: Sequence[Sequence[int]], batch_size: int = 64) -> list[list[float]]:
    """w_j for every token of every rationale (an empty rationale gets [])."""
    out: list[list[float]] = []
    for start in range(0, len(rationales), batch_size):
        chunk = list(rationales[start:start + batch_size])
        live = [r for r in chunk if len(r)]
        values = iter([])
        if live:
            ids, padding = _pad(live)
            w = module(ids, padding)
            values = iter([w[i, :len(r)].tolist() for i, r in enumerate(live)])
        out.extend(next(values) if len(r) else [] for r in chunk)
    return out


def logit(p: float) -> float:
    return math.log(p / (1 - p))
