"""Model capacity on a molecule: where NICE saturates, and an affine-coupling yardstick.

Every model gets the same task and the same data, so that what differs is the model alone:
maximum likelihood on the Boltzmann distribution at the target temperature, given as
importance-weighted samples of a trained run's flow (exact weights: each training batch is
resampled in proportion to them), through the run's coordinate map, held fixed. For each model
it reports:
  * the held-out NLL in nats, the self-normalised weighted mean of -log q on samples kept out
    of training: the forward KL to the Boltzmann distribution up to a constant that is the same
    for every model (for D > d the stochastic bound of the note's redundant latents), so
    differences between rows are differences in forward KL;
  * the reverse ESS/N of --n-eval fresh samples of the fitted model (exact energies);
  * parameters and training seconds.
The sweep varies one thing at a time around the example's model (12 couplings of [128, 128],
D = d + 6): the number of couplings, their width and the number of redundant latents. The
yardstick replaces the additive couplings by affine ones (RealNVP: y_B = x_B exp(s(x_A)) +
t(x_A), tanh-bounded s), same layout, same training: defined here only, not part of the
package. If the affine flow fits much better at equal size, the additive couplings are what
limits the model; if NICE stops improving with size while the run's reverse-KL model is far
below the fitted ones, the training is short.

The run itself (its reverse-KL training, the data's source) is the first row, measured the
same way. Prints a table, then one JSON line.

    python benchmarks/capacity.py --run RUN                  # the default sweep
    python benchmarks/capacity.py --run RUN --models nice-L12-H128-E6,affine-L12-H128-E6
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

import torch
from torch import Tensor

from openmm_nice.analysis.reweighting import effective_sample_size
from openmm_nice.flows.generator import BoltzmannGenerator
from openmm_nice.flows.transforms import ComposedTransform, Transform, mlp
from openmm_nice.runs import load_run
from openmm_nice.training.trainer import nll

DEFAULT_MODELS = (
    "nice-L6-H128-E6",
    "nice-L12-H128-E6",
    "nice-L24-H128-E6",
    "nice-L12-H64-E6",
    "nice-L12-H256-E6",
    "nice-L12-H128-E0",
    "nice-L12-H128-E18",
    "affine-L12-H128-E6",
    "affine-L12-H128-E0",
)
_SPEC = re.compile(r"^(nice|affine)-L(\d+)-H(\d+)-E(\d+)$")


class AffineCoupling(Transform):
    r"""The yardstick's coupling: :math:`y_B = x_B e^{s(x_A)} + t(x_A)`, :math:`y_A = x_A`,
    with :math:`s = 2 \tanh(\cdot)`; log-det :math:`\sum s`. Benchmark-only."""

    def __init__(self, mask: Tensor, hidden: list[int]):
        super().__init__()
        self.register_buffer("index_a", torch.nonzero(mask).flatten())
        self.register_buffer("index_b", torch.nonzero(~mask).flatten())
        self.net = mlp(len(self.index_a), 2 * len(self.index_b), hidden, zero_last=True)

    def _scale_shift(self, x_a: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(x_a).chunk(2, dim=-1)
        return 2.0 * torch.tanh(s / 2.0), t

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(x[:, self.index_a])
        out = x.clone()
        out[:, self.index_b] = x[:, self.index_b] * torch.exp(s) + t
        return out, s.sum(-1)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self._scale_shift(y[:, self.index_a])
        out = y.clone()
        out[:, self.index_b] = (y[:, self.index_b] - t) * torch.exp(-s)
        return out, -s.sum(-1)


def affine_flow(nice: ComposedTransform, hidden: list[int]) -> ComposedTransform:
    """Affine couplings on the same partitions as the NICE flow ``nice``."""
    layers = []
    for coupling in nice.transforms:
        mask = torch.zeros(len(coupling.index_a) + len(coupling.index_b), dtype=torch.bool)
        mask[coupling.index_a] = True
        layers.append(AffineCoupling(mask, hidden))
    return ComposedTransform(layers)


def build_model(spec: str, run) -> BoltzmannGenerator:
    match = _SPEC.match(spec)
    if match is None:
        raise SystemExit(f"model spec {spec!r} is not KIND-L<layers>-H<width>-E<extra latents>")
    kind, layers, width, extra = match.group(1), *map(int, match.groups()[1:])
    d = run.generator.dim
    generator = BoltzmannGenerator(
        run.generator.energy,
        latent_dim=d + extra,
        layers=layers,
        hidden=[width, width],
        conditional_hidden=list(run.config.model.conditional_hidden),
        coordinates=copy.deepcopy(run.generator.coordinates),
        scale=run.config.model.scale,
        seed=run.config.seed,
    )
    if kind == "affine":
        generator.flow = affine_flow(generator.flow, [width, width])
    return generator.to(run.generator.dtype)


def held_out_nll(generator, x: Tensor, w: Tensor, rng, batch: int = 8192) -> float:
    """The self-normalised weighted mean of -log q over held-out samples, evaluated in batches
    without gradients and summed in float64 (samples of undefined density left out)."""
    with torch.no_grad():
        log_q = torch.cat(
            [generator.log_prob(x[i : i + batch], rng=rng) for i in range(0, len(x), batch)]
        )
    finite = torch.isfinite(log_q)
    w = w[finite] / w[finite].sum()
    return float(-(w * log_q[finite].double()).sum())


def fit(generator, x: Tensor, w: Tensor, steps: int, batch: int, lr: float, seed: int) -> float:
    rng = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam([p for p in generator.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr / 100)
    start = time.perf_counter()
    generator.train()
    for _ in range(steps):
        index = torch.multinomial(w, batch, replacement=True, generator=rng)
        optimizer.zero_grad(set_to_none=True)
        loss = nll(generator, x[index], rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(generator.parameters(), 100.0)
        optimizer.step()
        scheduler.step()
    generator.eval()
    return time.perf_counter() - start


def reverse_ess(generator, n: int, seed: int) -> float:
    with torch.no_grad():
        _, log_w = generator.sample(n, rng=torch.Generator().manual_seed(seed))
    return effective_sample_size(log_w) / n


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a trained run (the data's source)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated specs")
    p.add_argument("--n-data", type=int, default=200_000, help="weighted samples of the run")
    p.add_argument("--held-out", type=float, default=0.2, help="share kept out of training")
    p.add_argument("--n-eval", type=int, default=20_000, help="samples for each reverse ESS")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    run = load_run(args.run)
    torch.manual_seed(args.seed)
    with torch.no_grad():
        x, log_w = run.generator.sample(args.n_data, rng=torch.Generator().manual_seed(args.seed))
    keep = torch.isfinite(log_w)
    x, log_w = x[keep].to(run.generator.dtype), log_w[keep].double()
    n_test = int(len(x) * args.held_out)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed + 1))
    test, train = order[:n_test], order[n_test:]
    w_train = torch.softmax(log_w[train], 0)
    w_test = torch.softmax(log_w[test], 0)
    data_ess = effective_sample_size(log_w) / len(log_w)
    rng = torch.Generator().manual_seed(args.seed + 2)
    d = run.generator.dim
    print(
        f"d = {d}; data: {len(x)} samples of the run's flow, ESS/N {data_ess:.3f} "
        f"({len(train)} train, {n_test} held out); {args.steps} steps of batch "
        f"{args.batch_size} per model"
    )

    rows = []
    run_params = sum(q.numel() for q in run.generator.parameters())
    rows.append(
        dict(
            model=f"the run (reverse-KL recipe, D = {run.generator.latent_dim})",
            parameters=run_params,
            held_out_nll=held_out_nll(run.generator, x[test], w_test, rng),
            ess=reverse_ess(run.generator, args.n_eval, args.seed + 3),
            train_s=None,
        )
    )
    for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
        generator = build_model(spec, run)
        seconds = fit(
            generator,
            x[train],
            w_train,
            args.steps,
            args.batch_size,
            args.learning_rate,
            args.seed,
        )
        rows.append(
            dict(
                model=f"{spec} (D = {generator.latent_dim})",
                parameters=sum(q.numel() for q in generator.parameters()),
                held_out_nll=held_out_nll(generator, x[test], w_test, rng),
                ess=reverse_ess(generator, args.n_eval, args.seed + 3),
                train_s=seconds,
            )
        )
        print(
            f"  {rows[-1]['model']}: held-out NLL {rows[-1]['held_out_nll']:.3f}, "
            f"ESS/N {rows[-1]['ess']:.3f}, {seconds:.0f} s",
            flush=True,
        )

    print(
        f"\n{'model':48s} {'parameters':>10s} {'held-out NLL':>13s} {'ESS/N':>7s} {'train s':>8s}"
    )
    for r in rows:
        seconds = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
        print(
            f"{r['model']:48s} {r['parameters']:10d} {r['held_out_nll']:13.3f} "
            f"{r['ess']:7.3f} {seconds:>8s}"
        )
    result = dict(
        benchmark="capacity",
        run=str(args.run),
        d=d,
        n_data=len(x),
        data_ess=data_ess,
        steps=args.steps,
        batch_size=args.batch_size,
        rows=rows,
    )
    print(json.dumps(result))
    run.close()
    return result


if __name__ == "__main__":
    main()
