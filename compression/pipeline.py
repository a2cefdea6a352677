"""The one compression pipeline: load, inventory, select ranks, decompose,
fine-tune, evaluate, export. Used by the CLI and, inside its sandbox, the worker.

``compress`` writes ``model.pt`` (TorchScript), ``model.pt2`` (ExportedProgram),
``report.json`` and a self-contained ``report.html``; ``sweep`` runs it over
several budgets and adds the accuracy-vs-MACs curve.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from compression.budget import Budget
from compression.data import load_dataset, train_val_split
from compression.errors import TensorTrimError, UnsupportedModelError
from compression.evaluate import evaluate, measure_latency
from compression.export import ExportCheck, export_pt2, export_torchscript
from compression.finetune import VAL_FRACTION, layer_map
from compression.finetune import finetune as run_finetune
from compression.input_spec import InputSpec
from compression.inventory import Inventory, build_inventory, count_macs, count_params
from compression.metrics import relative_error
from compression.model_io import EditableModel, load_torchscript, to_editable
from compression.plan import RankPlan, plan_by_ratio
from compression.progress import WHOLE_RUN, Overall, Progress, silent
from compression.ranks import Data, SelectionContext, default_method, get_method
from compression.report import write_html
from compression.rewrite import apply_plan

CHECK_BATCH = 4
TEST_FRACTION = 0.2  # of user data held out for the report's accuracy; never trained on
LATENCY_BATCHES = (1, 16)


@dataclass
class CompressResult:
    inventory: Inventory
    plan: RankPlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    max_output_deviation: float  # relative, compressed vs original on random inputs
    route: str
    budget: str | None = None
    files: dict[str, ExportCheck] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)  # {"original": {...}, "compressed": {...}, "after_decompose"}
    latency: dict = field(default_factory=dict)  # {"cpu": {"1": {original_ms, compressed_ms, speedup}}}
    finetune: dict | None = None
    file_sizes: dict = field(default_factory=dict)

    @property
    def macs_ratio(self) -> float:
        return self.macs_before / max(self.macs_after, 1)

    @property
    def params_ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    def to_dict(self) -> dict:
        return {
            "budget": self.budget,
            "route": self.route,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "max_output_deviation": self.max_output_deviation,
            "evaluation": self.evaluation,
            "latency": self.latency,
            "file_sizes": self.file_sizes,
            "finetune": self.finetune,
            "plan": self.plan.to_dict(),
            "inventory": self.inventory.to_dict(),
            "files": {k: asdict(v) for k, v in self.files.items()},
            "seconds": self.seconds,
        }


def load_editable(model: str | Path | torch.jit.ScriptModule, spec: InputSpec) -> tuple[torch.jit.ScriptModule,
                                                                                          EditableModel]:
    ts = load_torchscript(model) if isinstance(model, (str, Path)) else model
    return ts, to_editable(ts, spec)


def compress(
    model: str | Path | torch.jit.ScriptModule,
    input_spec: InputSpec | str,
    budget: Budget | str | None = None,
    *,
    out_dir: str | Path,
    method: str | None = None,
    form: str = "tucker2",
    ranks: float | RankPlan = 0.5,
    data: Data | str | Path | None = None,
    finetune: bool | dict = False,
    method_options: dict | None = None,
    device: str = "cpu",
    seed: int = 0,
    latency: bool = True,
    progress: Progress = silent,
) -> CompressResult:
    """Compress ``model`` and write the files and reports into ``out_dir``.

    Ranks: with ``budget`` (``'flops:3x'``, ``'params:0.4'``, ``'latency:8ms@1'``)
    they are chosen by ``method`` (default: the best method for the data given),
    else ``ranks`` is one ratio of every layer's maximum ranks or a ready plan.
    ``data`` (a ``Data``, or a ``.npz`` / image-folder zip path) feeds
    data-aware rank selection, fine-tuning and the report's accuracy; 20 % of
    it is held out for evaluation. ``finetune`` is False, True (defaults) or a
    dict of ``compression.finetune.finetune`` options (``{}``: the defaults, as
    True); without data it distils on inputs synthesised from the batch-norm
    statistics (data-free mode).
    """
    ft_options = finetune_options(finetune)
    spec = InputSpec.parse(input_spec) if isinstance(input_spec, str) else input_spec
    budget = Budget.parse(budget) if isinstance(budget, str) else budget
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    timer = _Timer(seconds)

    with timer("convert"):
        progress("load", 0.0, "loading and converting the model")
        ts, editable = load_editable(model, spec)
        gm = editable.gm
        fit, test = _split(data, spec, seed)
        progress("load", 1.0, f"converted by the {editable.route} route")

    inventory = build_inventory(gm, spec)
    if not inventory.decomposable:
        found = ", ".join(sorted(f"{x.name}: {x.skip_reason}" for x in inventory.layers))
        raise UnsupportedModelError(
            f"the model has no layer TensorTrim can decompose ({found or 'no conv or linear layer'})",
            code="no_decomposable_layer",
        )
    teacher = copy.deepcopy(gm)  # the original, as the reference for distillation and evaluation

    with timer("ranks"):
        if budget is not None or method == "manual":
            # manual ranks need no budget; one of "keep everything" only prices the plan
            selector, plan = _select(gm, inventory, spec, budget or Budget("flops", keep=1.0), form, method,
                                     selection_data(fit, ft_options, seed), method_options, device, seed,
                                     progress, finetune_follows=ft_options is not None)
            # Methods that train the network (BATUDE) may hand back trained weights:
            # then the factors come from those, not from the original.
            if hasattr(selector, "load_trained"):
                selector.load_trained(gm)
        else:
            plan = ranks if isinstance(ranks, RankPlan) else plan_by_ratio(inventory, ranks, form)

    with timer("decompose"):
        progress("decompose", 0.0, f"decomposing {len(plan.layers)} layers")
        apply_plan(gm, inventory, plan)
        gm.eval()
        progress("decompose", 1.0, f"{len(plan.layers)} layers factorised")

    check = spec.example(CHECK_BATCH if editable.dynamic_batch else spec.example_batch, seed=1)
    reference = _eval_data(test, spec, check)
    evaluation = {"after_decompose": evaluate(gm, reference, reference=teacher, spec=spec, device=device)}

    finetune_report = None
    if ft_options is not None:
        with timer("finetune"):
            result = run_finetune(gm, teacher, fit, spec=spec, layers=layer_map(inventory, gm), seed=seed,
                                  device=device, progress=progress, **ft_options)
            finetune_report = result.to_dict()
        gm.eval()

    with timer("evaluate"):
        progress("evaluate", 0.0, "measuring accuracy and agreement")
        with torch.no_grad():
            deviation = relative_error(gm(*check), ts(*check))
            macs_after = count_macs(gm, check)
        evaluation["original"] = evaluate(teacher, reference, reference=teacher, spec=spec, device=device)
        evaluation["compressed"] = evaluate(gm, reference, reference=teacher, spec=spec, device=device)
        evaluation["data"] = "held-out 20 % of the data" if test is not None else "random inputs from the spec"
        progress("evaluate", 1.0, "done")

    with timer("export"):
        progress("export", 0.0, "writing TorchScript and .pt2")
        example = spec.example(spec.example_batch, seed=2)
        files = {
            "model.pt": export_torchscript(gm, out / "model.pt", example),
            "model.pt2": export_pt2(gm, out / "model.pt2", example),
        }
        progress("export", 1.0, "files written and verified")

    result = CompressResult(
        inventory=inventory,
        plan=plan,
        macs_before=inventory.total_macs,
        macs_after=macs_after,
        params_before=inventory.total_params,
        params_after=count_params(gm),
        max_output_deviation=deviation,
        route=editable.route,
        budget=str(budget) if budget is not None else None,
        files=files,
        seconds=seconds,
        evaluation=evaluation,
        finetune=finetune_report,
    )
    if isinstance(model, (str, Path)):
        result.file_sizes = {"original": Path(model).stat().st_size, "model.pt": files["model.pt"].size_bytes,
                             "model.pt2": files["model.pt2"].size_bytes}
    if latency:
        with timer("latency"):
            result.latency = _latency(ts, out / "model.pt", spec, editable, device, progress)
    write_reports(result.to_dict(), out)
    return result


def sweep(model: str | Path | torch.jit.ScriptModule, input_spec: InputSpec | str, budgets: list[str], *,
          out_dir: str | Path, progress: Progress = silent, **kwargs) -> dict:
    """Compress at each budget (into ``out_dir/<budget>``) and return the
    accuracy-vs-MACs curve; also writes ``sweep.json`` and ``report.html``.
    Progress comes as one ``sweep`` phase over all budgets, the budget and the
    inner phase in the message."""
    out = Path(out_dir)
    points = []
    for i, text in enumerate(budgets):
        overall = Overall()

        def step(phase: str, fraction: float, message: str = "", i: int = i, text: str = text,
                 overall: Overall = overall) -> None:
            whole = (i + overall.update(phase, fraction)) / len(budgets)
            progress(WHOLE_RUN, whole, f"[{text}, {i + 1}/{len(budgets)}] {phase}: {message}")

        result = compress(model, input_spec, text, out_dir=out / _slug(text), progress=step, **kwargs)
        comp = result.evaluation["compressed"]
        points.append({"budget": text, "macs_after": result.macs_after, "macs_ratio": result.macs_ratio,
                       "params_after": result.params_after,
                       "accuracy": comp.get("top1") if comp.get("top1") is not None else comp.get("agreement"),
                       "metric": "top1" if comp.get("top1") is not None else "agreement",
                       "dir": _slug(text)})
        original = result.evaluation["original"]
    progress(WHOLE_RUN, 1.0, f"{len(budgets)} budgets done")
    report = {"sweep": points, "macs_before": result.macs_before, "params_before": result.params_before,
              "original_accuracy": original.get("top1") if original.get("top1") is not None else 1.0,
              "plan": {"method": result.plan.method, "layers": [], "dense": {}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=2))
    write_html(report, out / "report.html")
    return report


def write_reports(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_html(report, out / "report.html")


class _Timer:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def __call__(self, name: str) -> _Timer:
        self.name = name
        return self

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self.name] = time.perf_counter() - self.start


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def _split(data: Data | str | Path | None, spec: InputSpec, seed: int) -> tuple[Data | None, Data | None]:
    """(data for rank selection + fine-tuning, held-out data for the report)."""
    if data is None:
        return None, None
    if not isinstance(data, Data):
        data = load_dataset(data, input_spec=spec, labels=False)
    if len(data) < 10:
        raise TensorTrimError(f"the data set has {len(data)} samples; at least 10 are needed", code="bad_dataset")
    return train_val_split(data, TEST_FRACTION, seed=seed)


def finetune_options(finetune: bool | dict | None) -> dict | None:
    """``compress``'s ``finetune`` as fine-tuning options, None when off. An empty dict means
    the defaults (as the API sends when no field is set), not off."""
    if finetune is None or finetune is False:
        return None
    return {} if finetune is True else dict(finetune)


def selection_data(fit: Data | None, finetune: dict | None, seed: int) -> Data | None:
    """The data rank selection may use: with fine-tuning to follow, only the part fine-tuning
    trains on. BATUDE trains weights it can hand on; trained on fine-tuning's validation
    split too, they would be judged on images they had seen: early stopping and the best
    checkpoint favoured the start (kept as best in 5 of 6 hard-pull runs at 2x fewer MACs
    before this; README, "BATUDE's pull")."""
    if fit is None or finetune is None:
        return fit
    fraction = finetune.get("val_fraction", VAL_FRACTION)
    return train_val_split(fit, fraction, seed)[0]


def _eval_data(test: Data | None, spec: InputSpec, check: tuple[torch.Tensor, ...]) -> Data:
    if test is not None:
        return test
    n = 64 if check[0].shape[0] == CHECK_BATCH else check[0].shape[0]  # fixed-shape graphs run one batch only
    return Data(spec.example(n, seed=3))


def _select(gm: torch.fx.GraphModule, inventory: Inventory, spec: InputSpec, budget: Budget, form: str,
            method: str | None, data: Data | None, options: dict | None, device: str, seed: int,
            progress: Progress, *, finetune_follows: bool = False) -> tuple[object, RankPlan]:
    """Choose ranks under ``budget`` (measuring a latency table first if needed)."""
    latency = None
    if budget.metric == "latency":
        from compression.latency import build_latency_table

        forms = None if form == "auto" else (form,)
        latency = build_latency_table(gm, inventory, spec, batch=budget.batch, device=device, progress=progress,
                                      forms=forms)
    ctx = SelectionContext(gm, inventory, spec, budget, form=form, data=data, progress=progress, device=device,
                           seed=seed, options=dict(options or {}), latency=latency, finetune_follows=finetune_follows)
    selector = get_method(method or default_method(data is not None))
    return selector, selector.select(ctx)


def _latency(ts: torch.jit.ScriptModule, compressed_path: Path, spec: InputSpec, editable: EditableModel,
             device: str, progress: Progress) -> dict:
    """Original vs compressed TorchScript, side by side, on the CPU and (if
    present) CUDA; batch 1 and 16 (only the converted batch for fixed shapes)."""
    compressed = torch.jit.load(str(compressed_path), map_location="cpu").eval()
    batches = LATENCY_BATCHES if editable.dynamic_batch else (spec.example_batch,)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and device.startswith("cuda") else [])
    out: dict = {}
    for dev in devices:
        out[dev] = {}
        for b in batches:
            progress("latency", 0.0, f"timing batch {b} on {dev}")
            before = measure_latency(ts, spec, batch=b, device=dev, warmup=2, repeats=7)
            after = measure_latency(compressed, spec, batch=b, device=dev, warmup=2, repeats=7)
            out[dev][str(b)] = {"original_ms": before["median_ms"], "compressed_ms": after["median_ms"],
                                "speedup": before["median_ms"] / max(after["median_ms"], 1e-9)}
    progress("latency", 1.0, "done")
    return out
