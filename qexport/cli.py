"""``qexport`` command line: thin wrappers, one library call per command.

The whole flow, in order: ``train`` (or ``quantize``) -> ``size`` -> ``onnx`` ->
``ort`` / ``tvm`` / ``trt`` -> ``verify`` -> ``report``; ``demo`` runs it all on
the offline default. Every :class:`~qexport.errors.QexportError` becomes one
line on stderr and its exit code (2 for bad input, 1 for a failed parity check).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from qexport.errors import ConfigError, QexportError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Integer-only BERT/RoBERTa: train, export to integer ONNX, compile, verify, report.",
    pretty_exceptions_enable=False,
)

Out = Annotated[Path | None, typer.Option("-o", "--output", help="output path")]


def _version(value: bool) -> None:
    if value:
        from qexport import __version__

        typer.echo(f"qexport {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Integer-only BERT/RoBERTa: train, export to integer ONNX, compile, verify, report."""


def _echo_json(obj: object) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _shapes(spec: str | None) -> dict[str, str] | None:
    """``batch=8,seq=128`` -> ``{"batch": "8", "seq": "128"}`` (values may be ``1:8:32`` ranges)."""
    if not spec:
        return None
    out: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep or key.strip() not in ("batch", "seq") or not val.strip():
            raise ConfigError(f"bad --shapes entry {part!r}: use batch=N,seq=N (or min:opt:max)")
        out[key.strip()] = val.strip()
    return out


# ----------------------------------------------------------------------------- train / quantize / size


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (see recipes/)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set qat.lr=1e-5")] = None,
    output: Out = None,
    resume: Annotated[bool, typer.Option(help="continue from the last training state in -o")] = False,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto (default: the recipe's)")] = None,
) -> None:
    """FP fine-tuning then QAT from a recipe; writes an integer checkpoint."""
    from qexport.config import load_recipe
    from qexport.train import train as run_train

    rec = load_recipe(recipe, set_ or [])
    out = output or Path("artifacts") / recipe.stem
    summary = run_train(rec, out, resume=resume, device=device)
    _echo_json(summary)


@app.command()
def quantize(
    model: Annotated[str, typer.Option(help="model dir, hub name, minilm or random:ARCH")] = "minilm",
    preset: Annotated[str, typer.Option(help="fp, linear, linear+gelu+softmax, ..., full")] = "full",
    weight_bits: Annotated[int, typer.Option(help="encoder weight bits: 8, 4 or 2")] = 8,
    emb_bits: Annotated[int, typer.Option(help="embedding bits: 8, 4 or 2")] = 8,
    groups: Annotated[
        str | None, typer.Option(help="only these layer groups get --weight-bits (ALL, MHA, FFN, QKV, ...)")
    ] = None,
    data: Annotated[str | None, typer.Option(help="calibration task (rt, bbc, csv:PATH, ...)")] = None,
    calib_batches: Annotated[int, typer.Option(help="calibration batches")] = 8,
    batch_size: int = 16,
    max_length: int = 128,
    num_labels: Annotated[int | None, typer.Option(help="classes (default: the task's, else 2)")] = None,
    output: Out = None,
) -> None:
    """Post-training quantization: calibrate activation ranges, write an integer checkpoint."""
    from qexport.ptq import post_training_quantize

    path = post_training_quantize(
        model, preset=preset, weight_bits=weight_bits, emb_bits=emb_bits, data=data,
        calib_batches=calib_batches, batch_size=batch_size, max_length=max_length,
        num_labels=num_labels, out_dir=output or Path("artifacts/checkpoint"), groups=groups,
    )
    from qexport.report.size import checkpoint_size, format_size_table

    typer.echo(f"wrote {path}")
    typer.echo(format_size_table(checkpoint_size(path)))


@app.command()
def size(
    checkpoint: Annotated[Path, typer.Argument(help="integer checkpoint directory")],
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """True size by part against FP32 and FP16 of the same model."""
    from qexport.report.size import checkpoint_size, format_size_table

    rep = checkpoint_size(checkpoint)
    if json_:
        _echo_json(rep)
    else:
        typer.echo(format_size_table(rep))


# ----------------------------------------------------------------------------- export and backends


@app.command()
def onnx(
    checkpoint: Annotated[Path, typer.Argument(help="integer checkpoint directory")],
    output: Out = None,
    form: Annotated[str, typer.Option(
        help="functions (qexport ops), flat (ai.onnx only) or ort-cpu (ORT's CPU graph)")] = "functions",
    linear: Annotated[str | None, typer.Option(
        help="qdq (TensorRT-compatible) or integer (MatMulInteger); default: qdq, ort-cpu: integer")] = None,
    opset: Annotated[int | None, typer.Option(help="ai.onnx opset")] = None,
    u8s8: Annotated[str | None, typer.Option(
        help="ort-cpu only: portable (exact on any x86 CPU, the default) or vnni (faster; exact only "
             "on CPUs with VNNI/AMX, refused elsewhere)")] = None,
) -> None:
    """Export an integer checkpoint to integer ONNX."""
    from qexport.export.exporter import FORMS, export_onnx

    if form not in (*FORMS, "ort-cpu"):
        raise ConfigError(f"unknown form {form!r}: choose {', '.join(FORMS)} or ort-cpu")
    if u8s8 is not None and form != "ort-cpu":
        raise ConfigError("--u8s8 applies to --form ort-cpu only")
    out = output or checkpoint / f"model.{form}.onnx"
    linear = linear or ("integer" if form == "ort-cpu" else "qdq")
    if form == "ort-cpu":
        from qexport.backends.ort import export_ort_cpu

        path = export_ort_cpu(checkpoint, out, u8s8=u8s8 or "portable", linear=linear, opset=opset)
    else:
        path = export_onnx(checkpoint, out, form=form, linear=linear, opset=opset)
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


@app.command()
def ort(
    model: Annotated[Path, typer.Argument(help="ONNX model")],
    data: Annotated[str, typer.Option(help="rt, bbc, csv:PATH, txt:PATH, ...")] = "rt",
    split: str = "test",
    limit: Annotated[int | None, typer.Option(help="first N examples")] = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_length: int = 128,
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer directory (default: the one the ONNX file records)")
    ] = None,
) -> None:
    """Run an ONNX model with ONNX Runtime on a data set: predictions and accuracy."""
    from qexport.verify import run_on_data

    res = run_on_data("ort", model, data, split=split, limit=limit, device=device,
                      batch_size=batch_size, max_length=max_length, tokenizer_dir=tokenizer)
    _echo_json(res)


@app.command()
def tvm(
    model: Annotated[Path, typer.Argument(help="ONNX model (functions are inlined first)")],
    target: Annotated[str, typer.Option(help="llvm, cuda, t4, h100 or a JSON target")] = "llvm",
    shapes: Annotated[str | None, typer.Option(help="batch=8,seq=128 (default: dynamic)")] = None,
    output: Out = None,
    tune: Annotated[int, typer.Option(help="MetaSchedule trials (llvm, static --shapes; 0: no tuning)")] = 0,
    tune_db: Annotated[Path | None, typer.Option(help="tuning database dir (default: OUT/tune-db)")] = None,
) -> None:
    """Compile an ONNX model with Apache TVM into a shared library + sidecar."""
    from qexport.backends import get_backend

    out = output or model.with_suffix("").with_name(model.stem + f".tvm-{target.replace('/', '_')[:20]}")
    sh = _shapes(shapes)
    path = get_backend("tvm").compile(
        model, out, target=target, shapes=None if sh is None else {k: int(v) for k, v in sh.items()},
        tune=tune, tune_db=tune_db,
    )
    typer.echo(f"wrote {path}")


@app.command()
def trt(
    model: Annotated[Path, typer.Argument(help="ONNX model (flat form, --linear qdq)")],
    output: Out = None,
    precision: Annotated[str, typer.Option(help="int8, fp16 or fp32")] = "int8",
    target: Annotated[str, typer.Option(help="t4 or h100: TensorRT builds for the local GPU")] = "t4",
    shapes: Annotated[str, typer.Option(help="min:opt:max per axis")] = "batch=1:8:32,seq=16:128:256",
    workspace: Annotated[int, typer.Option(help="workspace MB")] = 4096,
    timing_cache: Annotated[Path | None, typer.Option(help="timing cache file")] = None,
    check: Annotated[bool, typer.Option("--check", help="only lint against TensorRT's ONNX support")] = False,
) -> None:
    """Build a TensorRT engine (or, with --check, lint the graph offline)."""
    from qexport.backends.trt import check_onnx_file, format_findings
    from qexport.backends.trt_support import errors_only

    findings = check_onnx_file(model)
    if check:
        typer.echo(format_findings(findings))
        raise typer.Exit(2 if errors_only(findings) else 0)
    from qexport.backends import get_backend

    out = output or model.with_suffix(".plan")
    if target not in ("t4", "h100", "auto"):
        raise ConfigError(f"unknown --target {target!r}: t4, h100 or auto (engines are built on the GPU)")
    path = get_backend("trt").compile(
        model, out, precision=precision, shapes=shapes, workspace_mb=workspace, timing_cache=timing_cache
    )
    typer.echo(f"wrote {path}")


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="integer checkpoint directory")],
    backend: Annotated[str, typer.Option(help="ort, tvm or trt")] = "ort",
    model: Annotated[Path | None, typer.Option(help="ONNX file / TVM dir / TRT plan")] = None,
    data: Annotated[str, typer.Option(help="rt, bbc, csv:PATH, txt:PATH")] = "rt",
    split: str = "test",
    limit: Annotated[int | None, typer.Option(help="first N examples")] = None,
    batch_size: int = 16,
    max_length: int = 128,
    device: str = "cpu",
    output: Out = None,
) -> None:
    """Bit-exact parity of a backend against the integer reference; exit 1 on any mismatch."""
    from qexport.errors import ParityError
    from qexport.verify import verify as run_verify

    res = run_verify(checkpoint, backend, model, data, split=split, limit=limit, batch_size=batch_size,
                     max_length=max_length, device=device, out_dir=output or checkpoint)
    _echo_json(res)
    if res["mismatches"]:
        raise ParityError(
            f"{res['mismatches']} logits_int elements differ between {backend} and the reference"
        )


# ----------------------------------------------------------------------------- report, sweep, demo


@app.command()
def report(
    checkpoint: Annotated[Path | None, typer.Argument(help="integer checkpoint (or use --model)")] = None,
    model: Annotated[str | None, typer.Option(help="model spec to PTQ-quantize first")] = None,
    backends: Annotated[str, typer.Option(help="comma list: torch,ort,tvm,trt")] = "torch,ort,tvm,trt",
    device: str = "cpu",
    batch: Annotated[str, typer.Option(help="comma list")] = "1,8",
    seq: Annotated[str, typer.Option(help="comma list")] = "128",
    iters: int = 20,
    torch_compile: Annotated[bool, typer.Option(help="add torch.compile FP16 rows (GPU)")] = False,
    output: Out = None,
) -> None:
    """True size and latency across backends: report.json, report.md, plots."""
    from qexport.report.latency import parse_int_list, run_report

    if checkpoint is None and model is None:
        raise ConfigError("give a CHECKPOINT or --model SPEC")
    res = run_report(
        checkpoint, model, [b.strip() for b in backends.split(",") if b.strip()], device,
        parse_int_list(batch), parse_int_list(seq), iters, output or Path("artifacts/report"),
        torch_compile=torch_compile,
    )
    typer.echo(res.get("markdown", json.dumps(res, default=str)[:2000]))


@app.command()
def sweep(
    recipes: Annotated[list[Path], typer.Argument(help="recipe YAML files")],
    output: Out = None,
) -> None:
    """Run several recipes; write the comparison table and the seeds' plots."""
    from qexport.train.sweep import run_sweep

    path = run_sweep(list(recipes), output or Path("artifacts/sweep"))
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    output: Out = None,
    recipe: Annotated[Path, typer.Option(help="recipe to train")] = Path("recipes/rt-minilm-full.yaml"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe override")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print summary.json instead of the table")] = False,
) -> None:
    """The whole pipeline on the offline default: train -> onnx -> ORT + TVM -> verify -> report."""
    from rich.console import Console

    from qexport.demo import run_demo, summary_table

    summary = run_demo(output or Path("artifacts/demo"), recipe, set_ or [])
    if json_:
        _echo_json(summary)
    else:
        Console().print(summary_table(summary))


@app.command()
def env(
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Versions, CPU model and features, and which backends can run here (and why not)."""
    from qexport.env import environment, format_environment

    info = environment()
    if json_:
        _echo_json(info)
    else:
        typer.echo(format_environment(info))


def _usage_error_types() -> tuple[type[Exception], ...]:
    """click's usage errors: typer >= 0.20 vendors click as ``typer._click``, older typers use click."""
    import importlib

    found: list[type[Exception]] = []
    for mod in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(importlib.import_module(mod).ClickException)
    return tuple(found)


def _usage_error(exc: Exception) -> int:
    """A click usage error: the command's usage line (when known) and one ``error:`` line; exit 2."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare ``qexport``: the help
        typer.echo(ctx.get_help(), err=True)
        return 2
    if ctx is not None:
        typer.echo(ctx.get_usage(), err=True)
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    typer.echo(f"error: {message}", err=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Console entry point: QexportError -> one line on stderr + its exit code.

    A usage error (unknown command or option, missing argument, bad value) prints the usage
    line and one ``error:`` line and exits 2, like any other bad input.
    """
    usage_errors = _usage_error_types()
    try:
        rc = app(args=argv, prog_name="qexport", standalone_mode=False)
        if isinstance(rc, int):  # typer.Exit(code) inside a command, with standalone_mode=False
            return rc
    except QexportError as exc:
        typer.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except usage_errors as exc:
        return _usage_error(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
