#!/usr/bin/env python
"""What the Triton statistics kernel costs on a Hopper GPU, without one: each tile of
``triton_kernel.TILES`` compiled ahead of time for sm_90 (H100, H200) by Triton's own ptxas,
then read with its cuobjdump.

    python scripts/kernel_resources.py            # every tile, SiLU, with the distributions
    python scripts/kernel_resources.py --all      # every activation, with and without them,
                                                  # computing act(g) or reading the model's,
                                                  # a text's positions or an expert's packed

Compiled as a scan launches it: pointers and the sizes (texts, positions, neurons) marked
16-divisible, as Triton marks them at launch for real shapes (d_mlp 11008, 1024 positions).
Prints per tile the registers per thread, the stack (a spill goes there: it should be 0)
and the machine instructions per activation: the whole kernel's static instruction count
over the activations a thread holds per tile (the loop body dominates it): a proxy for the
arithmetic, not a timing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gatescope.stats.triton_kernel import TILES, stats_kernel
from gatescope.stats.triton_pass import _DISTRIBUTION_CONSTANTS, ACTIVATIONS

POINTERS = {
    "g_ptr": "*bf16", "u_ptr": "*bf16", "s_ptr": "*bf16", "valid_ptr": "*u8",
    "strength_ptr": "*fp32", "position_ptr": "*i32", "weakest_ptr": "*fp32",
    "sums_ptr": "*fp64", "count_ptr": "*i32", "histogram_ptr": "*i32", "joint_ptr": "*i32",
    "salt_ptr": "*i64", "key_ptr": "*i64",
}  # fmt: skip
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def resources(
    tile: tuple[int, int, int], act: int, distributions: bool, swish: bool = False,
    packed: bool = False,
) -> dict[str, float]:  # fmt: skip
    """Registers, stack bytes and instructions per activation of one compiled variant
    (``packed``: an expert's tokens, whose positions in their texts the draw loads)."""
    block_p, block_n, warps = tile
    constants = {"ACT": act, "HAS_SWISH": swish, "HISTOGRAMS": distributions,
                 "TYPICAL": distributions, "PACKED": packed, "BLOCK_P": block_p,
                 "BLOCK_N": block_n, **_DISTRIBUTION_CONSTANTS}  # fmt: skip
    # packed: valid holds the tokens' positions in their texts, int32
    signature = POINTERS | {"valid_ptr": "*i32" if packed else "*u8"}
    signature |= dict.fromkeys(("texts", "length", "neurons"), "i32")
    signature |= dict.fromkeys(constants, "constexpr")
    aligned = {*POINTERS, "texts", "length", "neurons"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(stats_kernel.arg_names)
             if name in aligned}  # fmt: skip
    source = ASTSource(fn=stats_kernel, signature=signature, constexprs=constants, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps})  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "stats.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = _run("--dump-resource-usage", cubin)
        sass = _run("-sass", cubin)
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+\S", sass, re.MULTILINE))
    per_thread = block_p * block_n / (32 * warps)  # activations a thread holds per tile
    return {
        "registers": int(re.search(r"REG:(\d+)", usage)[1]),  # pyright: ignore[reportOptionalSubscript]
        "stack": int(re.search(r"STACK:(\d+)", usage)[1]),  # pyright: ignore[reportOptionalSubscript]
        "instructions": instructions / per_thread,
    }


def _run(flag: str, cubin: Path) -> str:
    return subprocess.run([TOOLS / "cuobjdump", flag, cubin], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every activation, with and without")
    args = parser.parse_args()
    acts = ACTIVATIONS if args.all else {"silu": ACTIVATIONS["silu"]}
    both = (True, False) if args.all else (False,)
    # (distributions, packed): the packed positions are read by the typical draw only
    draws = ((True, False), (True, True), (False, False)) if args.all else ((True, False),)
    for p, n, w in TILES:
        for name, act in acts.items():
            for distributions, packed in draws:
                for swish in both:
                    r = resources((p, n, w), act, distributions, swish, packed)
                    print(f"tile {p:>2} x {n:<3} {w} warps, {name:<9} distributions "
                          f"{'yes' if distributions else 'no ':<3} packed "
                          f"{'yes' if packed else 'no ':<3} model's act(g) "
                          f"{'yes' if swish else 'no ':<3}: {r['registers']:>3} registers, "
                          f"stack {r['stack']:>4} B, {r['instructions']:>4.0f} instructions "
                          "per activation")  # fmt: skip


if __name__ == "__main__":
    main()
