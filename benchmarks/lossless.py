"""How much does the lossless removal find, what does it cost, and what does it change?

Three parts (``--parts``, default all):

* ``proofs``: per network, the units proved dead on the data's box (per input feature, the
  default; per channel; interval bounds alone), the seconds the proof took, and, as the ceiling
  any proof on that box could reach, the units that are constant at their readers on the data
  itself (the data lies in the box, so a unit that some sample moves can never be proved dead).
  Networks: the four shipped examples (box: their train split), two digits MLPs trained from the
  shipped initial weights with a learning rate too high on purpose (``dying``: Adam at 0.03 and
  0.1, 20 epochs, so that some ReLUs die), and the untrained zoo of ``tests/models.py`` (box: 512
  standard-normal samples).
* ``accuracy``: test accuracy and MACs at 50/30/15% of the MACs with ``l1``, lossless removal
  on and off, for the examples and the dying MLPs (``--mip-model``: also ``mip`` for one model).
* ``milp``: the LEO-style tightening, exact MILPs (big-M ReLUs with the propagated bounds, HiGHS)
  maximising the pre-activation of units that the data never activates (at most
  ``--milp-max-units`` per layer, ``--milp-time-limit`` seconds each), for the MLPs (a unit is
  proved dead when the solver's upper bound is below 0): how many more it proves, and the time.

Run (about 15 minutes on 2 shared cores without ``--mip-model``)::

    python benchmarks/lossless.py
    python benchmarks/lossless.py --parts proofs --quick --out /tmp/lossless.json   # seconds

It prints Markdown tables and writes JSON (default ``benchmarks/results/lossless.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pulp
import torch
from torch import fx, nn

import oamipc
from oamipc.data import DataSplits, accuracy, fashion_mnist_available, load_data
from oamipc.finetune import FinetuneConfig, finetune
from oamipc.passes import DeadUnitAnalysis, UnitGroupAnalysis
from oamipc.passes.input_bounds import below_zero, propagate
from oamipc.passmanager import AnalysisManager, CompileContext, InputRange
from oamipc.solver import solve
from oamipc.tracing import trace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.models import ZOO, build, example_input  # noqa: E402 - the zoo lives with the tests

EXAMPLES = {"digits_mlp": "digits", "digits_cnn": "digits", "fashion_mlp": "fashion-mnist",
            "fashion_lenet5": "fashion-mnist"}
DYING = {"digits_mlp_lr0.03": 0.03, "digits_mlp_lr0.1": 0.1}
BUDGETS = (0.5, 0.3, 0.15)


# ----------------------------------------------------------------------------------------------
# the networks


def _dying(lr: float) -> nn.Module:
    """The shipped digits MLP's initial weights trained 20 epochs with Adam at ``lr`` (too high)."""
    model = oamipc.load_model(ROOT / "examples" / "digits_mlp_init.pt")
    finetune(model, load_data("digits").train, FinetuneConfig(epochs=20, lr=lr, optimizer="adam",
                                                                  schedule="constant", seed=0))
    return model.eval()


def networks(quick: bool) -> list[tuple[str, nn.Module, torch.Tensor, DataSplits | None]]:
    """(name, model, the samples whose range is the box, labelled data or None)."""
    out: list[tuple[str, nn.Module, torch.Tensor, DataSplits | None]] = []
    for name, spec in EXAMPLES.items():
        if spec == "fashion-mnist" and (quick or not fashion_mnist_available()):
            continue
        data = load_data(spec)
        out.append((name, oamipc.load_model(ROOT / "examples" / f"{name}.pt").eval(), data.train.x, data))
    for name, lr in DYING.items():
        if quick and lr != 0.1:
            continue
        out.append((name, _dying(lr), load_data("digits").train.x, load_data("digits")))
    for name in ZOO:
        if quick and name not in ("mlp", "mobilenet"):
            continue
        out.append((f"zoo/{name}", build(name), example_input(name, 512), None))
    return out


# ----------------------------------------------------------------------------------------------
# proofs


class _Readers(fx.Interpreter):
    """Runs a graph and keeps what every module node reads."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.inputs: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "call_module" and n.args and isinstance(n.args[0], fx.Node):
            self.inputs[n.name] = self.env[n.args[0]]
        return super().run_node(n)


def constant_on(gm: fx.GraphModule, graph: Any, x: torch.Tensor) -> np.ndarray:
    """Free units whose every position, at every reader, holds one value on all of ``x`` (the ceiling
    of any proof on a box that contains ``x``)."""
    layers = [layer for layer in graph.layers if layer.kind in ("linear", "conv")]
    reference = _Readers(gm)
    with torch.no_grad():
        reference.run(x[:1])
    varies = np.zeros(graph.n_units, dtype=bool)
    for start in range(0, len(x), 5000):
        readers = _Readers(gm)
        with torch.no_grad():
            readers.run(x[start:start + 5000])
        for layer in layers:
            dim = 1 if layer.kind == "conv" else readers.inputs[layer.node].dim() - 1
            moved = readers.inputs[layer.node] != reference.inputs[layer.node]
            moving = moved.movedim(dim, 0).reshape(moved.shape[dim], -1).any(1).numpy()
            units = layer.in_units
            np.logical_or.at(varies, units[units >= 0], moving[units >= 0])
    return ~varies & ~graph.pinned_mask()


def proofs(nets: list[tuple[str, nn.Module, torch.Tensor, DataSplits | None]]) -> list[dict[str, Any]]:
    rows = []
    for name, model, x, _ in nets:
        gm = trace(model, (x[:1],))
        row: dict[str, Any] = {"network": name, "box_samples": len(x)}
        for key, options in (("feature", {}), ("interval", {"bounds": "interval"}), ("channel", {"box": "channel"})):
            am = AnalysisManager(CompileContext((x[:1],), x[:512], input_range=InputRange.of(x, name)))
            graph = am.get(UnitGroupAnalysis(), gm)
            start = time.perf_counter()
            dead = am.get(DeadUnitAnalysis(**options), gm)
            row[f"dead_{key}"] = dead.count
            row[f"seconds_{key}"] = time.perf_counter() - start
            if key == "feature":
                row["relus"] = dead.relus
                row["groups"] = dead.summary(graph)["groups"]
        row["units_free"] = int((~graph.pinned_mask()).sum())
        row["units"] = graph.n_units
        row["constant_on_data"] = int(constant_on(gm, graph, x[:20000]).sum())
        rows.append(row)
        print(f"  {name}: {row['dead_feature']} dead of {row['units_free']} free units "
              f"({row['seconds_feature']:.2f} s); constant on the data: {row['constant_on_data']}", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# accuracy


def accuracy_rows(nets: list[tuple[str, nn.Module, torch.Tensor, DataSplits | None]], mip_model: str | None,
                  budgets: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for name, model, x, data in nets:
        if data is None:
            continue
        example = x[:1]
        base = accuracy(model, data.test)
        criteria = ["l1", "mip"] if name == mip_model else ["l1"]
        for criterion in criteria:
            for budget in budgets:
                row: dict[str, Any] = {"network": name, "criterion": criterion, "budget": budget, "dense": base}
                plans = {}
                for on in (False, True):
                    start = time.perf_counter()
                    result = oamipc.compile(model, example, data=data, importance=criterion, flops_budget=budget,
                                            lossless=on)
                    tag = "on" if on else "off"
                    row[f"acc_{tag}"] = result.report["accuracy"]["after"]
                    row[f"macs_{tag}"] = result.report["after"]["macs"] / result.report["before"]["macs"]
                    row[f"seconds_{tag}"] = time.perf_counter() - start
                    plans[tag] = result.plan
                    if on:
                        row["dead_removed"] = result.report["lossless"]["units_removed"]
                        row["lossless_seconds"] = result.report["lossless"]["seconds"]
                row["same_plan"] = plans["on"].groups == plans["off"].groups
                rows.append(row)
                print(f"  {name} {criterion} {budget}: off {row['acc_off']:.4f}, on {row['acc_on']:.4f} "
                      f"({row['dead_removed']} dead removed)", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# LEO-style MILP


def _mlp_layers(gm: fx.GraphModule) -> list[tuple[str, nn.Linear]] | None:
    """The Linear layers of a flatten -> (Linear -> ReLU)* -> Linear network, or None."""
    layers = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Linear):
            layers.append((n.name, gm.get_submodule(str(n.target))))
    return layers or None


def milp_rows(nets: list[tuple[str, nn.Module, torch.Tensor, DataSplits | None]], time_limit: float,
              max_units: int) -> list[dict[str, Any]]:
    """Exact MILPs for the hidden units of MLPs that the data never activates (see the module docstring)."""
    rows = []
    for name, model, x, _ in nets:
        gm = trace(model, (x[:1],))
        kinds = {type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes if n.op == "call_module"}
        if not kinds <= {"Flatten", "Linear", "ReLU"}:
            continue
        layers = _mlp_layers(gm)
        assert layers is not None
        lo, hi = x.amin(0, keepdim=True), x.amax(0, keepdim=True)
        bounds = propagate(gm, lo, hi)
        order = [n.name for n in gm.graph.nodes]
        pre = []  # per hidden layer: (weight, bias, lower, upper bounds of the pre-activation)
        for node, mod in layers[:-1]:
            relu = order[order.index(node) + 1]
            lo_k, hi_k = bounds.relu_inputs[relu]  # the tightest bounds, as the ReLU saw them
            pre.append((mod.weight.detach().double().numpy(), mod.bias.detach().double().numpy(),
                        (lo_k.flatten().numpy(), hi_k.flatten().numpy()), relu))
        with torch.no_grad():
            acts: list[np.ndarray] = []
            h = x.flatten(1)
            for _, mod in layers[:-1]:
                a = mod(h)
                acts.append((a > 0).any(0).numpy())
                h = torch.relu(a)
        row: dict[str, Any] = {"network": name, "candidates": 0, "proved_dead": 0, "already_dead": 0,
                               "solved": 0, "statuses": {}, "seconds": 0.0, "per_layer": []}
        flat_lo, flat_hi = lo.flatten().double().numpy(), hi.flatten().double().numpy()
        for k, (w, b, (lo_k, hi_k), _) in enumerate(pre):
            dead = below_zero(torch.from_numpy(lo_k), torch.from_numpy(hi_k), bounds.n_vars + 2).numpy()
            never = np.nonzero(~acts[k])[0]
            already = [int(u) for u in never if dead[u]]
            layer_row = {"layer": layers[k][0], "never_active_on_data": len(never), "dead_by_bounds": len(already),
                         "proved": 0, "seconds": 0.0, "upper_bounds": []}
            for u in [u for u in never if not dead[u]][:max_units]:
                start = time.perf_counter()
                prob = pulp.LpProblem(f"unit_{k}_{u}", pulp.LpMaximize)
                xs = [pulp.LpVariable(f"x{i}", flat_lo[i], flat_hi[i]) for i in range(len(flat_lo))]
                h_vars: list[Any] = xs
                for j in range(k):
                    wj, bj, (lj, uj), _ = pre[j]
                    nxt: list[Any] = []
                    for i in range(wj.shape[0]):
                        expr = pulp.LpAffineExpression([(h_vars[t], float(wj[i, t])) for t in range(wj.shape[1])
                                                        if wj[i, t] != 0], constant=float(bj[i]))
                        if uj[i] <= 0:
                            nxt.append(0.0)
                            continue
                        hv = pulp.LpVariable(f"h{j}_{i}", 0.0, float(uj[i]))
                        if lj[i] >= 0:
                            prob += hv == expr
                        else:
                            z = pulp.LpVariable(f"z{j}_{i}", cat=pulp.LpBinary)
                            prob += hv >= expr
                            prob += hv <= expr - float(lj[i]) * (1 - z)
                            prob += hv <= float(uj[i]) * z
                        nxt.append(hv)
                    h_vars = nxt
                terms = [(h_vars[t], float(w[u, t])) for t in range(w.shape[1])
                         if w[u, t] != 0 and not isinstance(h_vars[t], float)]
                prob += pulp.LpAffineExpression(terms, constant=float(b[u]))
                result = solve(prob, solver="highs", time_limit=time_limit)
                seconds = time.perf_counter() - start
                bound = result.dual_bound
                layer_row["upper_bounds"].append(bound)
                layer_row["seconds"] += seconds
                row["solved"] += 1
                row["statuses"][result.status] = row["statuses"].get(result.status, 0) + 1
                if bound is not None and bound < -1e-5:
                    layer_row["proved"] += 1
            row["candidates"] += len(never)
            row["already_dead"] += len(already)
            row["proved_dead"] += layer_row["proved"]
            row["seconds"] += layer_row["seconds"]
            row["per_layer"].append(layer_row)
        rows.append(row)
        print(f"  {name}: {row['candidates']} units never active on the data, {row['already_dead']} dead by the "
              f"bounds, {row['proved_dead']} more by MILP ({row['solved']} solved: {row['statuses']}) in "
              f"{row['seconds']:.1f} s", flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# output


def print_tables(result: dict[str, Any]) -> None:
    if result.get("proofs"):
        print("\n| network | free units | dead (feature box) | s | dead (interval only) | s | dead (channel box) "
              "| constant on the data |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["proofs"]:
            print(f"| {r['network']} | {r['units_free']} | {r['dead_feature']} | {r['seconds_feature']:.2f} | "
                  f"{r['dead_interval']} | {r['seconds_interval']:.2f} | {r['dead_channel']} | "
                  f"{r['constant_on_data']} |")
    if result.get("accuracy"):
        print("\n| network | criterion | MACs kept | dead removed | acc. off | acc. on | MACs off | MACs on "
              "| same plan |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in result["accuracy"]:
            print(f"| {r['network']} | {r['criterion']} | {r['budget']} | {r['dead_removed']} | {r['acc_off']:.4f} | "
                  f"{r['acc_on']:.4f} | {r['macs_off']:.3f} | {r['macs_on']:.3f} | {r['same_plan']} |")
    if result.get("milp"):
        print("\n| network | never active on the data | dead by the bounds | MILPs solved (status) | more by MILP "
              "| MILP seconds |")
        print("|---|---|---|---|---|---|")
        for r in result["milp"]:
            statuses = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()))
            print(f"| {r['network']} | {r['candidates']} | {r['already_dead']} | {r['solved']} ({statuses}) | "
                  f"{r['proved_dead']} | {r['seconds']:.1f} |")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default="proofs,accuracy,milp")
    parser.add_argument("--quick", action="store_true", help="digits networks and two zoo models only")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--mip-model", default=None, help="also compare mip on/off for this network")
    parser.add_argument("--milp-time-limit", type=float, default=10.0, help="seconds per unit's MILP")
    parser.add_argument("--milp-max-units", type=int, default=10, help="MILPs per layer at most (lowest units)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lossless.json"))
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    nets = networks(args.quick)
    result: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                              "parts": sorted(parts)}
    if "proofs" in parts:
        print("proofs:", flush=True)
        result["proofs"] = proofs(nets)
    if "accuracy" in parts:
        print("accuracy:", flush=True)
        budgets = tuple(float(b) for b in args.budgets.split(","))
        result["accuracy"] = accuracy_rows(nets, args.mip_model, budgets)
    if "milp" in parts:
        print("milp:", flush=True)
        result["milp"] = milp_rows(nets, args.milp_time_limit, args.milp_max_units)
    print_tables(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float))
    return result


if __name__ == "__main__":
    main()
