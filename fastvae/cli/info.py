"""``fastvae info``: versions, devices and which fastvae backends are usable here."""

from __future__ import annotations

import argparse
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and fastvae backends")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import fastvae as fv
    from fastvae.ops import backends, custom_ops, native, native_dispatch

    print(f"fastvae {fv.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}"
              + (" (interpreter: TRITON_INTERPRET=1)" if backends._triton_interpreting() else ""))
    except ImportError:
        print("triton not installed")
    print(f"CPU threads (torch): {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"sm_{props.major}{props.minor}")
    else:
        print("CUDA: no GPU")
    print("backends:")
    for name in backends.CONCRETE:
        reason = backends.unusable_reason(name)
        print(f"  {name:7s} {'usable' if reason is None else 'unusable: ' + reason}")
    info = native.build_info()
    if info is not None:
        print(f"native library: {info}; CPU kernels in use: {native.cpu_isa()} "
              f"(this CPU runs: {', '.join(native.cpu_isas())})")
    reason = native_dispatch.unusable_reason()
    if reason is None:
        served = ", ".join(custom_ops.SPEC[op].name for op in custom_ops.native_overloads())
        print(f"dispatcher path (libfastvae_torch, torch {torch.__version__}): {served}")
    else:
        print(f"dispatcher path: off ({reason})")
    print(f"selected: {fv.get_backend()} (cpu tensors -> {backends.resolve(torch.device('cpu'))}"
          + (f", cuda tensors -> {backends.resolve(torch.device('cuda'))}"
             if torch.cuda.is_available() else "") + ")")
    return 0
