"""Time forward + backward of the 3-layer composition MPNN with pooling.

Variants, interleaved in every repeat:
- fused: dvmrl.ops.model_forward (one core call forward, one backward);
- dense: dvmrl.reference.model_forward (dense [B, K, K] attention);
- edge: an edge-list PyTorch model written here (index_select gathers,
  scatter softmax and index_add, as in PyTorch Geometric; PyG's softmax is
  used when torch_geometric is installed);
- noop (only when named in --variants): a torch.autograd.Function with the
  fused op's inputs, output and gradients that computes nothing. Its time is
  what PyTorch's autograd costs around any custom kernel, so the faster
  PyTorch variant's time divided by it bounds the speed-up that any fused
  op can show at that size.

Each measurement is one forward and one backward of a batch, with
node_table and flat as leaves that require gradients (a training step
without the optimiser). Compositions have 2 to 5 elements (uniform), so
K = 5.

Every repeat runs each variant for a block of consecutive steps, in a
shuffled order. The first step of a block (when the block has more than
one) finds the caches, TLB and branch predictors holding another
variant's state, or the CPU waking from idle; it is reported apart as
``cold_ms`` and left out of ``ms``, so ``ms`` is the steady per-step time
of a stream of batches, which is what graphs/s means. ``--block 1`` times
every step, the first of each block included (per-step interleaving).

The PyTorch variants run at each count in ``--torch-threads`` (default 1
and all cores). With two threads, every small parallel region of PyTorch
wakes the second thread, which made small batches 4-7 times slower than
on one thread on a 2-core VM. The speed-up column divides the fastest
PyTorch time over variants and thread counts by each row's time. fused
and noop run with --threads for dvmrl and PyTorch alike.

The FLOP count is that of the per-node (decomposed) formulation,
forward plus backward (3x the forward), and floor_fraction is the time
those FLOPs would take at the machine's measured float32 matmul rate
divided by the measured time.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_message_passing.py --json bench_mp.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import dvmrl
from dvmrl import ops, reference
from dvmrl._runtime import _available_cores as available_cores
from dvmrl.cli._common import bench_threads_problem, output_file_problem
from dvmrl.layout import ModelDims, parameter_count, unflatten

ROWS = 103
SLOTS = 5
# Variants that compute the model in PyTorch; "vs best torch" uses the faster.
TORCH_VARIANTS = ("dense", "edge")

try:  # optional: PyTorch Geometric's scatter softmax
    from torch_geometric.utils import softmax as pyg_softmax
except ImportError:  # pragma: no cover - depends on the environment
    pyg_softmax = None


def make_dims(hidden: int) -> ModelDims:
    return ModelDims(
        hidden=hidden,
        gate_hidden=hidden,
        msg_hidden=hidden,
        layers=3,
        head_hidden=128,
        head_layers=2,
        n_out=1,
    )


def make_inputs(batch, dims, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(2, SLOTS + 1, (batch,), generator=g)
    mask = torch.arange(SLOTS)[None, :] < sizes[:, None]
    index = torch.randint(0, ROWS, (batch, SLOTS), generator=g) * mask
    frac = (torch.rand(batch, SLOTS, generator=g) + 0.05) * mask
    frac = frac / frac.sum(dim=1, keepdim=True)
    table = torch.randn(ROWS, dims.hidden, generator=g)
    flat = torch.randn(parameter_count(dims), generator=g) / math.sqrt(dims.hidden)
    leaves = [t.to(device, dtype).requires_grad_() for t in (table, flat)]
    return (
        leaves[0],
        leaves[1],
        index.to(device),
        frac.to(device, dtype),
        mask.to(device),
        sizes,
    )


# -- edge-list model -----------------------------------------------------------


def scatter_softmax(logits, weights, group, n_groups):
    """Return a_e = w_e exp(g_e) / sum_{e' in group} w_e' exp(g_e')."""
    if pyg_softmax is not None:
        return pyg_softmax(logits + torch.log(weights), group, num_nodes=n_groups)
    group_max = torch.full((n_groups,), -torch.inf, dtype=logits.dtype, device=logits.device)
    group_max = group_max.scatter_reduce(0, group, logits, reduce="amax", include_self=True)
    scores = weights * torch.exp(logits - group_max.index_select(0, group))
    denom = torch.zeros(n_groups, dtype=logits.dtype, device=logits.device)
    denom = denom.index_add(0, group, scores)
    return scores / denom.index_select(0, group)


def edge_graph(mask):
    """Return node -> composition, node -> (b, k) flat slot, and edges dst <- src."""
    batch, slots = mask.shape
    flat_slot = torch.nonzero(mask.reshape(-1)).squeeze(1)
    node_graph = flat_slot // slots
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=mask.device)
    offsets[1:] = torch.cumsum(mask.sum(dim=1), dim=0)
    local = torch.arange(slots, device=mask.device)
    pair = mask[:, :, None] & mask[:, None, :] & (local[:, None] != local[None, :])
    b, i, j = torch.nonzero(pair, as_tuple=True)
    dst = offsets[b] + i
    src = offsets[b] + j
    return node_graph, flat_slot, dst, src


def edge_model_forward(node_table, flat, element_index, frac, mask, dims, graph):
    node_graph, flat_slot, dst, src = graph
    params = unflatten(flat, dims)
    n_nodes = node_graph.shape[0]
    weights = frac.reshape(-1).index_select(0, flat_slot)  # [N]
    h = node_table.index_select(0, element_index.reshape(-1).index_select(0, flat_slot))
    degree = torch.zeros(n_nodes, dtype=h.dtype, device=h.device)
    has_nb = degree.index_add(0, dst, torch.ones_like(dst, dtype=h.dtype)) > 0
    for layer in range(dims.layers):
        p = {k[len(f"layer{layer}.") :]: v for k, v in params.items() if k.startswith(f"layer{layer}.")}
        gi = h @ p["gate_w_i"].T
        gj = h @ p["gate_w_j"].T
        z = gi.index_select(0, dst) + gj.index_select(0, src) + p["gate_b"]
        gate = F.silu(z) @ p["gate_u"] + p["gate_d"]
        att = scatter_softmax(gate, weights.index_select(0, src), dst, n_nodes)
        mi = h @ p["msg_w1_i"].T
        mj = h @ p["msg_w1_j"].T
        s = F.silu(mi.index_select(0, dst) + mj.index_select(0, src) + p["msg_b1"])
        agg = torch.zeros(n_nodes, s.shape[1], dtype=h.dtype, device=h.device)
        agg = agg.index_add(0, dst, att[:, None] * s)
        h = h + agg @ p["msg_w2"].T + p["msg_b2"] * has_nb[:, None].to(h.dtype)
    gate = F.silu(h @ params["pool_gate_w"].T + params["pool_gate_b"]) @ params[
        "pool_gate_u"
    ] + params["pool_gate_d"]
    att = scatter_softmax(gate, weights, node_graph, mask.shape[0])
    msg = F.silu(h @ params["pool_msg_w1"].T + params["pool_msg_b1"])
    msg = msg @ params["pool_msg_w2"].T + params["pool_msg_b2"]
    pooled = torch.zeros(mask.shape[0], h.shape[1], dtype=h.dtype, device=h.device)
    pooled = pooled.index_add(0, node_graph, att[:, None] * msg)
    return reference.head(pooled, params, dims)


# -- autograd cost without work -------------------------------------------------


class NoopFunction(torch.autograd.Function):
    """The fused op's autograd interface around no computation.

    The forward saves the inputs the fused op saves and returns a zero
    [B, 1]; the backward returns uninitialised gradients of node_table and
    flat, as the fused backward allocates them.
    """

    @staticmethod
    def forward(ctx, node_table, flat, element_index, frac, mask):
        ctx.save_for_backward(node_table, flat, element_index, frac, mask)
        return node_table.new_zeros((element_index.shape[0], 1))

    @staticmethod
    def backward(ctx, grad_out):
        node_table, flat, *_ = ctx.saved_tensors
        return torch.empty_like(node_table), torch.empty_like(flat), None, None, None


# -- accounting ------------------------------------------------------------------


def gflop_count(sizes, dims: ModelDims) -> float:
    """FLOPs (in 1e9) of forward + backward in the decomposed formulation."""
    h, hg, hm, hh = dims.hidden, dims.gate_hidden, dims.msg_hidden, dims.head_hidden
    nodes = float(sizes.sum())
    edges = float((sizes * (sizes - 1)).sum())
    batch = float(sizes.numel())
    per_layer = nodes * (2 * h * (2 * hg + 2 * hm) + 2 * hm * h) + edges * (2 * hg + 2 * hm)
    pool = nodes * (2 * h * (hg + hm) + 2 * hg + 2 * hm) + batch * 2 * hm * h
    head = batch * (2 * h * hh + 2 * hh * hh * (dims.head_layers - 1) + 2 * hh * dims.n_out)
    forward = dims.layers * per_layer + pool + head
    return 3.0 * forward / 1e9


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device, size=2048, repeats=7) -> float:
    """Median float32 GFLOP/s of a size x size matmul on ``device``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return 2.0 * size**3 / statistics.median(times) / 1e9


def check_variants_agree(inputs, dims, graph, batch, hidden) -> None:
    """Raise RuntimeError unless fused and edge match dense, output and gradients.

    The timed step is forward + backward, so the gradients of node_table
    and flat are compared too. An explicit check, not an assert, so that
    python -O does not skip it.
    """
    table, flat = inputs[:2]
    results = {}
    for variant in ("dense", "edge", "fused"):
        out = step(variant, inputs, dims, graph)
        results[variant] = (out.detach(), table.grad.clone(), flat.grad.clone())
    for variant in ("edge", "fused"):
        for name, got, want in zip(
            ("output", "node_table gradient", "flat gradient"),
            results[variant],
            results["dense"],
            strict=True,
        ):
            scale = max(want.abs().max().item(), 1e-30)
            error = (got - want).abs().max().item()
            if not error <= 1e-4 * scale:
                raise RuntimeError(
                    f"B = {batch}, H = {hidden}: the {variant} model's {name} differs "
                    f"from the dense reference by {error:.3g} (largest value "
                    f"{scale:.3g}), so the variants compute different functions"
                )


def step(variant, inputs, dims, graph) -> torch.Tensor:
    """Run one forward + backward of ``variant`` and return its output [B, n_out]."""
    table, flat, index, frac, mask, _ = inputs
    table.grad = None
    flat.grad = None
    if variant == "fused":
        out = ops.model_forward(table, flat, index, frac, mask, dims)
    elif variant == "dense":
        out = reference.model_forward(table, flat, index, frac, mask, dims)
    elif variant == "noop":
        out = NoopFunction.apply(table, flat, index, frac, mask)
    else:
        out = edge_model_forward(table, flat, index, frac, mask, dims, graph)
    out.sum().backward()
    return out


def repeats_for(batch: int, requested: int | None) -> int:
    if requested is not None:
        return requested
    if batch >= 4096:
        return 5
    if batch >= 256:
        return 9
    return 15


def block_for(batch: int, requested: int | None) -> int:
    """Consecutive steps per variant and repeat; the first is cold when > 1."""
    if requested is not None:
        return requested
    if batch >= 4096:
        return 1
    if batch >= 256:
        return 4
    return 11


def timed_runs(variants, torch_threads, threads):
    """Return (variant, PyTorch threads) pairs: PyTorch variants at each count."""
    runs = []
    for v in variants:
        if v in TORCH_VARIANTS:
            runs.extend((v, t) for t in torch_threads)
        else:
            runs.append((v, threads))
    return runs


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = torch.float32
    threads = dvmrl.set_num_threads(args.threads)
    torch_threads = sorted(set(args.torch_threads or [1, threads]))
    if device.type == "cuda":
        # The PyTorch variants compute on the GPU, so one host thread count is timed.
        torch_threads = [threads]
    rate_before = matmul_gflops(device)
    rows = []
    rng = random.Random(0)
    for hidden in args.hidden:
        dims = make_dims(hidden)
        for batch in args.batches:
            inputs = make_inputs(batch, dims, device, dtype, seed=batch + hidden)
            graph = edge_graph(inputs[4])
            check_variants_agree(inputs, dims, graph, batch, hidden)
            runs = timed_runs(args.variants, torch_threads, threads)
            block = block_for(batch, args.block)
            times = {r: [] for r in runs}
            cold = {r: [] for r in runs}
            for v, t in runs:
                torch.set_num_threads(t)
                step(v, inputs, dims, graph)  # warm-up
            order = list(runs)
            for _ in range(repeats_for(batch, args.repeats)):
                last = order[-1]
                rng.shuffle(order)
                if len(order) > 1 and order[0] == last:
                    # The first step of a block must follow another run's steps.
                    order.append(order.pop(0))
                for v, t in order:
                    torch.set_num_threads(t)
                    for i in range(block):
                        synchronize(device)
                        t0 = time.perf_counter()
                        step(v, inputs, dims, graph)
                        synchronize(device)
                        elapsed = time.perf_counter() - t0
                        samples = cold if block > 1 and i == 0 else times
                        samples[(v, t)].append(elapsed)
            torch.set_num_threads(threads)
            gflop = gflop_count(inputs[5], dims)
            for v, t in runs:
                ms = statistics.median(times[(v, t)]) * 1e3
                cold_ms = statistics.median(cold[(v, t)]) * 1e3 if block > 1 else None
                # noop computes nothing, so it has no FLOPs and no floor fraction.
                work = None if v == "noop" else gflop
                rows.append(
                    {
                        "batch": batch,
                        "hidden": hidden,
                        "variant": v,
                        "threads": t,
                        "ms": ms,
                        "cold_ms": cold_ms,
                        "block": block,
                        "graphs_per_s": batch / (ms / 1e3),
                        "gflop": work,
                        "floor_fraction": (
                            None if work is None else (work / rate_before) / (ms / 1e3)
                        ),
                        "matmul_gflops": rate_before,
                        "device": device.type,
                    }
                )
            print_rows(rows[-len(runs) :], header=len(rows) == len(runs))
    rate_after = matmul_gflops(device)
    print(
        f"\nfloat32 {2048}^2 matmul: {rate_before:.0f} GFLOP/s before, "
        f"{rate_after:.0f} after (floor_fraction uses the first)"
    )
    return rows


def print_rows(rows, header):
    if header:
        print(
            f"{'B':>5} {'H':>4} {'variant':>7} {'threads':>7} {'ms':>10} "
            f"{'cold ms':>9} {'graphs/s':>11} {'GFLOP':>8} {'floor':>6} "
            f"{'vs faster PyTorch':>17}"
        )
    torch_ms = [r["ms"] for r in rows if r["variant"] in TORCH_VARIANTS]
    best_torch = min(torch_ms) if torch_ms else None
    for r in rows:
        speedup = "n/a" if best_torch is None else f"{best_torch / r['ms']:.2f}x"
        cold = "-" if r["cold_ms"] is None else f"{r['cold_ms']:.3f}"
        gflop = "-" if r["gflop"] is None else f"{r['gflop']:.3f}"
        floor = "-" if r["floor_fraction"] is None else f"{r['floor_fraction']:.1%}"
        print(
            f"{r['batch']:>5} {r['hidden']:>4} {r['variant']:>7} {r['threads']:>7} "
            f"{r['ms']:>10.3f} {cold:>9} {r['graphs_per_s']:>11.0f} {gflop:>8} "
            f"{floor:>6} {speedup:>17}"
        )
    sys.stdout.flush()


def machine_line(device) -> str:
    info = dvmrl.build_info()
    load = os.getloadavg()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    text = (
        f"cpu: {cpu}, {os.cpu_count()} logical cores, isa {info['cpu_isa']}, "
        f"threads {info['num_threads']}, torch {torch.__version__}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    if device.type == "cuda":
        text += f", gpu: {torch.cuda.get_device_name(device)}"
    return text


def positive_int(text: str) -> int:
    """Parse an integer >= 1 for argparse."""
    try:
        value = int(text)
    except ValueError:
        message = f"expected an integer >= 1, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=positive_int, nargs="+", default=[1, 16, 256, 4096],
        metavar="B", help="batch sizes in compositions (default: 1 16 256 4096)",
    )
    parser.add_argument(
        "--hidden", type=positive_int, nargs="+", default=[64, 128], metavar="H",
        help="hidden widths H = Hg = Hm (default: 64 128)",
    )
    parser.add_argument(
        "--variants", nargs="+", default=["fused", "dense", "edge"],
        choices=["fused", "dense", "edge", "noop"],
        help="variants to time (default: fused dense edge)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None,
        help="blocks per variant (default: 15 for B < 256, 9 for B < 4096, else 5)",
    )
    parser.add_argument(
        "--block", type=positive_int, default=None,
        help="consecutive steps per block; the first is timed apart as cold when the "
        "block has more than one (default: 11 for B < 256, 4 for B < 4096, else 1)",
    )
    cores = available_cores()
    parser.add_argument(
        "--threads", type=positive_int, default=None,
        help="CPU threads of dvmrl, and of PyTorch for fused and noop, at most the "
        f"{cores} cores available (default: all of them)",
    )
    parser.add_argument(
        "--torch-threads", type=positive_int, nargs="+", default=None,
        help="PyTorch thread counts at which dense and edge are timed, at most the "
        "cores available (default: 1 and --threads)",
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)"
    )
    parser.add_argument("--json", default=None, help="write the measurements to this file")
    args = parser.parse_args(argv)
    # Repeated names would time a variant twice and pool its samples.
    args.variants = list(dict.fromkeys(args.variants))
    # Without --threads the count comes from OMP_NUM_THREADS when set, which
    # must not exceed the cores either.
    problem = bench_threads_problem(args.threads)
    if problem:
        parser.error(problem)
    if args.torch_threads is not None and max(args.torch_threads) > cores:
        parser.error(
            f"--torch-threads: {max(args.torch_threads)} threads exceed the {cores} "
            f"cores available; pass at most {cores}, or the timings measure "
            "oversubscription"
        )
    if args.json:
        problem = output_file_problem(args.json)
        if problem:
            parser.error(f"--json {problem}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {args.device}: PyTorch sees no CUDA GPU here; pass --device cpu"
        )
    print(machine_line(device))
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    try:
        print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    except OSError:
        pass
    rows = run(args)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
