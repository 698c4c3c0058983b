"""Time and memory of TRL's ``generalized_jsd_loss`` vs minitron's drop-in, forward + backward, on CPU.

Run one provider per process (peak RSS is per process):

    python examples/trl_loss_cost.py --provider trl --beta 0.5
    python examples/trl_loss_cost.py --provider minitron --beta 0.5

Prints the median of ``--repeats`` forward+backward times and the growth of the process's peak RSS over the
inputs (both providers import the same modules first, so imports do not count).
"""
from __future__ import annotations

import argparse
import logging
import os
import resource
import time
from typing import Any, Optional, Sequence

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

log = logging.getLogger("examples.trl_loss_cost")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--provider", choices=("trl", "minitron"), required=True)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Returns ``{"median_s": float, "peak_rss_growth_mib": float, "loss": float}``."""
    args = parse_args(argv)
    from trl.experimental.gkd import GKDTrainer

    from minitron.integrations.trl import generalized_jsd_loss

    torch.set_num_threads(args.threads)
    fn = GKDTrainer.generalized_jsd_loss if args.provider == "trl" else generalized_jsd_loss
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    student, teacher = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    labels = torch.randint(0, args.vocab, shape[:2], generator=g)
    labels[:, : args.seq // 4] = -100  # a prompt that does not count
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, loss = [], float("nan")
    for _ in range(args.repeats + 1):  # the first run is a warm-up
        x = student.clone().requires_grad_(True)
        t0 = time.perf_counter()
        out = fn(x, teacher, labels=labels, beta=args.beta, temperature=args.temperature)
        out.backward()
        times.append(time.perf_counter() - t0)
        loss = float(out)
    growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB on Linux
    median = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    log.info("%s beta=%s [%d, %d, %d]: median %.0f ms, peak RSS growth %.0f MiB (student clone + its gradient: "
             "%.0f MiB), loss %.6f", args.provider, args.beta, *shape, 1e3 * median, growth,
             2 * student.numel() * 4 / 2 ** 20, loss)
    return {"median_s": median, "peak_rss_growth_mib": growth, "loss": loss}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
