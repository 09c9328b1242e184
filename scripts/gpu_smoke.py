"""Smoke test of the GPU backends, for the one call of scripts/gpu_check.sh.

Every op (the vector-quantization ops nearest_code, vector_quantize and
residual_vector_quantize included) x backend
(triton, cuda; cpu and triton under the interpreter with --dry-run) x the four dtypes x four
layouts (contiguous; strided and transposed views; stride-0 broadcast operands; a second mode:
K > 1 samples, free bits, a 3-D event, the cosine metric and the rotation trick), forward and
backward (every input's gradient under random upstream gradients), against the ``torch``
backend on the same device, with the test suite's tolerances (tests/helpers.py; indices
exactly equal), and each backend bitwise equal to itself run to run. One line per case,
written as it finishes; the last line is the summary.

    python scripts/gpu_smoke.py --out smoke.txt [--budget 60] [--dry-run]

The error of a case is max |got - want| / (atol * max(1, max |want|) + rtol * |want|) over
every output and gradient (<= 1 passes). Exit status 0 when every case that ran passed (the
cases left when the budget is spent are counted in the summary line).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

if not torch.cuda.is_available():  # before anything imports triton: its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import dtype_id, tolerance  # noqa: E402

import fastvae as fv  # noqa: E402
from fastvae.ops import backends  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LAYOUTS = ("contiguous", "strided", "broadcast", "variant")
OPS = ("reparameterize", "gaussian_kl", "bernoulli_nll", "gaussian_nll", "sample_and_kl",
       "iwae_log_likelihood", "continuous_bernoulli_nll", "discretized_mix_logistic_nll",
       "nearest_code", "vector_quantize", "residual_vector_quantize")
NOISY = ("reparameterize", "sample_and_kl")  # noise agrees across backends to float32 only


class Case:
    """Inputs of one (op, dtype, layout): leaves (tensors that get gradients, made on the
    device), views of them passed to the op, and the call."""

    def __init__(self, op: str, dtype: torch.dtype, layout: str, B: int, N: int,
                 device: torch.device, seed: int):
        self.op, self.dtype, self.layout = op, dtype, layout
        g = torch.Generator().manual_seed(seed)
        self.leaves: list[torch.Tensor] = []

        def base(*shape, scale=1.0, shift=0.0, grad=True):
            t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift)
            return t.to(dtype).to(device).requires_grad_(grad)

        def target(t):
            """Gradients are taken with respect to the tensors the op receives (views
            included): the backend's own output, before autograd sums a broadcast view's
            gradient in the input's dtype."""
            if t.requires_grad:
                self.leaves.append(t)
            return t

        def leaf(*shape, scale=1.0, shift=0.0, grad=True):
            return target(base(*shape, scale=scale, shift=shift, grad=grad))

        def pair(scale=0.5, shift=0.0, grad=True):
            """A (B, N) operand in this layout: plain, every other column of a transposed
            (2N, B) storage, or one row broadcast over B."""
            if layout == "strided":
                return target(base(2 * N, B, scale=scale, shift=shift, grad=grad)[::2].t())
            if layout == "broadcast":
                return target(base(1, N, scale=scale, shift=shift, grad=grad).expand(B, N))
            return leaf(B, N, scale=scale, shift=shift, grad=grad)

        def unit(grad=False):  # targets in [0, 1]
            t = torch.rand(B, N, generator=g, dtype=torch.float64).to(dtype).to(device)
            return t.requires_grad_(grad)

        variant = layout == "variant"
        seed_kw = {"seed": 1234 + seed}
        if op == "reparameterize":
            mu, lv = pair(), pair(shift=-0.5)
            kw = {"n_samples": 3, **seed_kw} if variant else seed_kw
            self.call = lambda: fv.reparameterize(mu, lv, **kw)
        elif op == "sample_and_kl":
            mu, lv = pair(), pair(shift=-0.5)
            kw = {"free_bits": 0.05, "reduction": "sum"} if variant else {"reduction": "none"}
            self.call = lambda: fv.sample_and_kl(mu, lv, **kw, **seed_kw)
        elif op == "gaussian_kl":
            mu, lv = pair(), pair(shift=-0.5)
            if layout == "broadcast":  # per-feature prior
                pm, plv = leaf(N, scale=0.3), leaf(N, scale=0.3)
                self.call = lambda: fv.gaussian_kl(mu, lv, pm, plv, reduction="none")
            elif variant:
                self.call = lambda: fv.gaussian_kl(mu, lv, reduction="mean", free_bits=0.05)
            else:
                self.call = lambda: fv.gaussian_kl(mu, lv, reduction="none")
        elif op == "bernoulli_nll":
            if variant:  # a 3-D event, summed
                logits = leaf(B, 2, N, scale=2.0)
                x = torch.rand(B, 2, N, generator=g, dtype=torch.float64).to(dtype).to(device)
                self.call = lambda: fv.bernoulli_nll(logits, x, reduction="sum")
            else:
                logits = pair(scale=2.0)
                x = unit()
                if layout == "strided":
                    x = x.t().contiguous().t()
                self.call = lambda: fv.bernoulli_nll(logits, x, reduction="none")
        elif op == "gaussian_nll":
            mean, x = pair(), pair(grad=False)
            if layout == "broadcast":  # per-feature logvar
                lv = leaf(N, scale=0.3)
                self.call = lambda: fv.gaussian_nll(mean, x, lv, reduction="none")
            elif variant:  # per-element logvar, mean reduction
                lv = leaf(B, N, scale=0.3)
                self.call = lambda: fv.gaussian_nll(mean, x, lv)
            else:
                self.call = lambda: fv.gaussian_nll(mean, x, 0.3, reduction="none")
        elif op == "iwae_log_likelihood":
            K = 16 if variant else 3
            mu, lv = pair(), pair(shift=-0.3)
            if layout == "strided":
                z = target(base(B, K, 2 * N)[..., ::2].transpose(0, 1))
            elif layout == "broadcast":
                z = target(base(1, B, N).expand(K, B, N))
            else:
                z = leaf(K, B, N)
            log_px = leaf(K, B, scale=3.0, shift=-20.0)
            self.call = lambda: fv.iwae_log_likelihood(log_px, z, mu, lv)
        elif op == "continuous_bernoulli_nll":
            if variant:  # logits far out (|l| up to ~40, the series and the tails), summed
                logits, x = leaf(B, N, scale=15.0), unit()
                self.call = lambda: fv.continuous_bernoulli_nll(logits, x, reduction="sum")
            else:
                logits, x = pair(scale=2.0), unit()
                self.call = lambda: fv.continuous_bernoulli_nll(logits, x, reduction="none")
        elif op == "discretized_mix_logistic_nll":
            # x on the bin grid, edges included; variant: one channel and 32 bins
            M, C, bins = (2, 1, 32) if variant else (3, 3, 256)
            P = M * (1 + 3 * C) if C == 3 else 3 * M
            k = torch.randint(0, bins, (B, C, N), generator=g, dtype=torch.float64)
            x = (k * (2.0 / (bins - 1)) - 1.0).to(dtype).to(device)
            if layout == "strided":  # params as a channels-last-like view
                params = target(base(B, N, P, scale=1.5).transpose(1, 2))
            elif layout == "broadcast":  # one image's parameters for the whole batch
                params = target(base(1, P, N, scale=1.5).expand(B, P, N))
            else:
                params = leaf(B, P, N, scale=1.5)
            self.call = lambda: fv.discretized_mix_logistic_nll(
                params, x, n_mixtures=M, n_bins=bins, reduction="none")
        elif op in ("nearest_code", "vector_quantize"):
            # x: B x N vectors of D (contiguous; a transposed (D, B N) storage; one row of N
            # vectors broadcast over B); codebook (K, D) with code K-1 a copy of code 0 (ties:
            # the lowest index); variant: the cosine metric (and the rotation trick).
            D, K = 3 + N // 40, max(7, N // 2 + 3)
            grad = op == "vector_quantize"
            if layout == "strided":
                x = target(base(D, B * N, grad=grad).t())
            elif layout == "broadcast":
                x = target(base(1, N, D, grad=grad).expand(B, N, D))
            else:
                x = leaf(B, N, D, grad=grad)
            cb = torch.randn(K, D, generator=g, dtype=torch.float64)
            cb[K - 1] = cb[0]
            codebook = target(cb.to(dtype).to(device).requires_grad_(grad))
            metric = "cosine" if variant else "l2"
            if op == "nearest_code":
                self.call = lambda: fv.nearest_code(x, codebook, metric=metric)
            else:
                st = "rotation" if variant else "ste"
                self.call = lambda: tuple(fv.vector_quantize(x, codebook, metric=metric,
                                                             straight_through=st))
        elif op == "residual_vector_quantize":
            # x as above, 3 levels of K codes (code K-1 of level 0 a copy of code 0); variant:
            # per-vector level counts (quantize dropout) and the rotation trick. The codebooks
            # take no gradient (the cuda backend has no kernel for it; triton's is tested in
            # tests/ops/test_residual_vq.py).
            D, K = 3 + N // 40, max(7, N // 2 + 3)
            if layout == "strided":
                x = target(base(D, B * N).t())
            elif layout == "broadcast":
                x = target(base(1, N, D).expand(B, N, D))
            else:
                x = leaf(B, N, D)
            cb = torch.randn(3, K, D, generator=g, dtype=torch.float64) * torch.tensor(
                [1.0, 0.5, 0.25], dtype=torch.float64)[:, None, None]
            cb[0, K - 1] = cb[0, 0]
            codebooks = cb.to(dtype).to(device)
            levels = (torch.randint(0, 4, (B, N), generator=g).to(device) if variant else None)
            st = "rotation" if variant else "ste"
            self.call = lambda: tuple(fv.residual_vector_quantize(
                x, codebooks, n_levels=levels, straight_through=st, reduction="none"))
        else:
            raise ValueError(op)
        # Upstream gradients: one per output, drawn once (float32/64 like the outputs).
        outs = self._outputs()
        self.out_grads = [torch.randn(o.shape, generator=g, dtype=torch.float64)
                          .to(o.dtype).to(device) for o in outs]

    def _outputs(self) -> list[torch.Tensor]:
        out = self.call()
        return list(out) if isinstance(out, tuple) else [out]

    def run(self, backend: str) -> list[torch.Tensor]:
        """Outputs, then the gradient of every leaf, under ``backend``."""
        with fv.use_backend(backend):
            outs = self._outputs()
            # outputs without a gradient (nearest_code's, the indices) take no upstream one
            pairs = [(o, g) for o, g in zip(outs, self.out_grads, strict=True) if o.requires_grad]
            grads = (torch.autograd.grad([o for o, _ in pairs], self.leaves,
                                         [g for _, g in pairs]) if self.leaves else ())
        return [o.detach() for o in outs] + list(grads)


def error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, noisy: bool) -> float:
    """The case's error measure (module docstring); inf for a shape or NaN mismatch."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    if not got.is_floating_point():  # indices: exact
        return 0.0 if torch.equal(got.cpu(), want.cpu()) else float("inf")
    tol = tolerance(got.dtype if got.is_floating_point() else dtype, noisy)
    g, w = got.double().cpu(), want.double().cpu()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return float("inf")
    finite = w[torch.isfinite(w)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    ok = ~torch.isnan(w)
    if not ok.any():
        return 0.0
    diff = (g[ok] - w[ok]).abs()
    diff = torch.where(g[ok] == w[ok], torch.zeros_like(diff), diff)  # equal infinities
    bound = tol["atol"] * scale + tol["rtol"] * w[ok].abs()
    return (diff / bound).max().item()


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.shape == y.shape and torch.equal(torch.nan_to_num(x), torch.nan_to_num(y))
               for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results file (one line per case)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds: no case starts after this (the rest is reported as not run)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU: cpu and triton (interpreter) backends, tiny sizes")
    args = p.parse_args(argv)

    gpu = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if gpu else "cpu")
    wanted = ("triton", "cuda") if gpu else ("cpu", "triton")
    usable = [b for b in wanted if backends.unusable_reason(b, device) is None]
    missing = [f"{b} ({backends.unusable_reason(b, device)})" for b in wanted
               if b not in usable]
    B, N = (37, 1000) if gpu else (3, 5)
    sink = args.out.open("w") if args.out else None

    def emit(line: str) -> None:
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    emit(f"# smoke on {torch.cuda.get_device_name() if gpu else 'cpu'}: backends "
         f"{', '.join(usable) or 'none'} against torch; B={B} N={N}"
         + (f"; unusable: {'; '.join(missing)}" if missing else ""))
    start = time.monotonic()
    passed, failed, not_run = 0, [], 0
    worst: tuple[float, str] = (0.0, "-")
    cases: list[tuple[str, torch.dtype, str]] = [
        (layout, dtype, op) for layout in LAYOUTS for dtype in DTYPES for op in OPS]
    for i, (layout, dtype, op) in enumerate(cases):
        if time.monotonic() - start > args.budget:
            not_run += (len(cases) - i) * len(usable)
            break
        name = f"{op} {dtype_id(dtype)} {layout}"
        try:
            case = Case(op, dtype, layout, B, N, device, seed=i)
            want = case.run("torch")
        except Exception as e:  # the torch backend itself: the case is broken, report it
            failed.append(f"{name} torch")
            emit(f"FAIL {name} torch: {type(e).__name__}: {e}".replace("\n", " "))
            continue
        for backend in usable:
            t0 = time.monotonic()
            label = f"{name} {backend}"
            try:
                got = case.run(backend)
                again = case.run(backend)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:
                failed.append(label)
                first = traceback.format_exception_only(type(e), e)[-1].strip()
                emit(f"FAIL {label}: {first[:400]}".replace("\n", " "))
                continue
            errs = [error(g, w, dtype, op in NOISY) for g, w in zip(got, want, strict=True)]
            n_out = len(want) - len(case.leaves)
            fwd, bwd = max(errs[:n_out]), max(errs[n_out:], default=0.0)
            same = bitwise_equal(got, again)
            ok = max(fwd, bwd) <= 1.0 and same
            worst = max(worst, (max(fwd, bwd), label))
            if ok:
                passed += 1
            else:
                failed.append(label)
            emit(f"{'ok  ' if ok else 'FAIL'} {label}: fwd err {fwd:.3g}, bwd err {bwd:.3g}, "
                 f"run to run {'bitwise equal' if same else 'DIFFERENT'}, "
                 f"{1e3 * (time.monotonic() - t0):.0f} ms")
    emit(f"smoke: {passed} passed, {len(failed)} failed, {not_run} not run (budget "
         f"{args.budget:.0f} s) in {time.monotonic() - start:.0f} s; worst error "
         f"{worst[0]:.3g} ({worst[1]})" + (f"; failed: {', '.join(failed[:8])}"
                                           + (" ..." if len(failed) > 8 else "")
                                           if failed else ""))
    if sink:
        sink.close()
    return 0 if not failed and usable else 1


if __name__ == "__main__":
    sys.exit(main())
