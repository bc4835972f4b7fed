"""Text pipelines, presets, option parsing, validation and the pass manager."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
from click.testing import CliRunner

import qonnx
from qonnx.analyses.activation_stats import ActivationStats, ChannelMeans
from qonnx.errors import PassError, PipelineParseError, PreconditionError, VerificationError
from qonnx.infra.base import Pass, PassResult
from qonnx.infra.context import Analysis, PassContext
from qonnx.infra.instruments import NumericVerifier, Reproducer, StructuralVerifier
from qonnx.infra.manager import PassManager
from qonnx.infra.pipeline import Pipeline
from qonnx.passes import PRESETS, REGISTRY, parse_pipeline, resolve
from tests.helpers import conv_bn_relu_conv, import_proto, make_samples

BUILTIN = {"canonicalize", "fold-bn", "plan", "calibrate"}


# --------------------------------------------------------------------------- REGISTRY
def test_builtin_passes_are_registered():
    reg = REGISTRY
    assert BUILTIN <= set(reg)
    for name, cls in reg.items():
        assert cls.name == name
        assert cls.summary and "\n" not in cls.summary
        # Options are frozen dataclasses whose fields all have defaults and help text.
        assert dataclasses.is_dataclass(cls.Options)
        assert cls.Options.__dataclass_params__.frozen
        for f in dataclasses.fields(cls.Options):
            assert f.default is not dataclasses.MISSING, f"{name}.{f.name} has no default"
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


# --------------------------------------------------------------------------- round trips
ROUND_TRIP = [
    "canonicalize",
    "canonicalize,fold-bn,plan,calibrate",
    "plan{per_channel=false}",
    "plan{exclude=[Conv_0;Conv_3]}",
    "plan{exclude=[/layer1/conv/Conv]}",
    "calibrate{method=percentile,percentile=99.9}",
    "calibrate{method=mse,weights=octav,samples=32,batch_size=4}",
    "fold-bn,plan{per_channel=false,exclude=[a]},calibrate{method=minmax}",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_str_round_trips(text):
    p = parse_pipeline(text)
    assert str(parse_pipeline(str(p))) == str(p)
    assert str(p) == text


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_canonical_round_trips_and_lists_every_option(text):
    p = parse_pipeline(text)
    canon = p.canonical()
    again = parse_pipeline(canon)
    assert again.canonical() == canon
    assert str(again) == str(p)  # the same configuration, only spelled in full
    for pass_ in again:
        for f in dataclasses.fields(pass_.options):
            assert f"{f.name}=" in pass_.spec(full=True)


def test_whitespace_and_hyphenated_option_names_are_normalised():
    p = parse_pipeline("  fold-bn , plan{ per-channel = false } ")
    assert str(p) == "fold-bn,plan{per_channel=false}"
    assert p.passes[1].options.per_channel is False


def test_typed_values():
    p = parse_pipeline("plan{per_channel=off,exclude=[a;b]},calibrate{percentile=99.5,samples=7}")
    plan, cal = p.passes
    assert plan.options.per_channel is False
    assert plan.options.exclude == ("a", "b")
    assert cal.options.percentile == pytest.approx(99.5) and isinstance(cal.options.percentile, float)
    assert cal.options.samples == 7 and isinstance(cal.options.samples, int)


def test_empty_option_braces_are_allowed():
    assert str(parse_pipeline("fold-bn{}")) == "fold-bn"


# --------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_expand_to_their_pipeline(preset):
    expanded = parse_pipeline(preset)
    assert str(expanded) == str(parse_pipeline(PRESETS[preset][0]))
    assert len(expanded) >= 1
    assert str(resolve(preset, None)) == str(expanded)


def test_default_pipeline_is_w8a8():
    assert str(resolve(None, None)) == str(parse_pipeline(PRESETS["w8a8"][0]))
    assert [p.name for p in resolve(None, None)] == PRESETS["w8a8"][0].split(",")


def test_preset_inside_a_pipeline_expands_in_place():
    p = parse_pipeline("w8a8-minmax")
    calibrate = next(q for q in p.passes if q.name == "calibrate")
    assert calibrate.options.method == "minmax" and [q.name for q in p.passes][-1] == "bias-correction"


def test_preset_with_options_is_refused():
    with pytest.raises(PipelineParseError, match="w8a8"):
        parse_pipeline("w8a8{method=mse}")


def test_resolve_rejects_preset_and_passes_together_and_unknown_presets():
    with pytest.raises(PipelineParseError, match="either"):
        resolve("w8a8", "fold-bn")
    with pytest.raises(PipelineParseError, match="w9a9"):
        resolve("w9a9", None)


# --------------------------------------------------------------------------- parse errors
@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("fold-bn,cle2", ["cle2"]),
        ("plan{per_chanel=false}", ["plan", "per_chanel"]),
        ("calibrate{methd=mse}", ["calibrate", "methd"]),
        ("fold-bn{foo=1}", ["fold-bn", "foo"]),
        ("plan{per_channel=maybe}", ["plan", "per_channel", "maybe"]),
        ("calibrate{samples=1.5}", ["calibrate", "samples", "1.5"]),
        ("calibrate{samples=ten}", ["calibrate", "samples"]),
        ("calibrate{percentile=high}", ["calibrate", "percentile"]),
        ("calibrate{method=kmeans}", ["calibrate", "method", "kmeans"]),
        ("calibrate{weights=entropy}", ["calibrate", "weights", "entropy"]),
        ("plan{weight_bits=5}", ["plan", "weight_bits"]),
        ("plan{per_channel}", ["plan", "per_channel"]),
        ("calibrate{method=mse,method=minmax}", ["calibrate", "method"]),
    ],
)
def test_parse_errors_name_the_pass_and_option(text, names):
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline(text)
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def test_same_option_under_two_spellings_is_refused():
    # 'per-channel' and 'per_channel' are the same option: giving both must not
    # silently keep the last one (design §6.1: no silently ignored keys).
    with pytest.raises(PipelineParseError, match="per.channel"):
        parse_pipeline("plan{per-channel=true,per_channel=false}")


def test_unknown_pass_lists_known_passes():
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline("no-such-pass")
    assert "no-such-pass" in str(info.value)
    assert "fold-bn" in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "fold-bn,", "fold-bn,,plan", "fold-bn plan", "fold-bn{x=1", "{}", "1abc"])
def test_malformed_text(text):
    with pytest.raises(PipelineParseError):
        parse_pipeline(text)


# --------------------------------------------------------------------------- validation
class SpyPass(Pass):
    """Not registered: records whether it ran."""

    name = "spy"
    summary = "records runs"
    edits_graph = False
    runs = 0

    def run(self, model, ctx):
        type(self).runs += 1
        return PassResult(model, False)


class RoundingPass(SpyPass):
    name = "fake-round"
    provides = frozenset({"rounded"})


def test_calibrate_without_data_fails_before_anything_runs():
    SpyPass.runs = 0
    cal = REGISTRY["calibrate"]()
    plan = REGISTRY["plan"]()
    pipe = Pipeline([SpyPass(), plan, cal])
    with pytest.raises(PreconditionError) as info:
        PassManager(pipe).run(import_proto(conv_bn_relu_conv()), PassContext())
    assert "calibrate" in str(info.value)
    assert "calibration" in str(info.value)
    assert SpyPass.runs == 0


def test_optimize_without_data_fails_before_any_pass(monkeypatch):
    ran = []
    for cls in REGISTRY.values():
        original = cls.run
        monkeypatch.setattr(cls, "run", lambda self, m, c, _o=original: (ran.append(self.name), _o(self, m, c))[1])
    with pytest.raises(PreconditionError, match="smooth"):
        qonnx.optimize(conv_bn_relu_conv(), None)
    assert ran == []


def test_calibrate_without_plan_names_the_missing_capability():
    with pytest.raises(PreconditionError) as info:
        parse_pipeline("calibrate").validate(frozenset({"calibration-data"}))
    assert "calibrate" in str(info.value) and "plan" in str(info.value)


def test_ordering_rule_calibrate_after_rounding_is_refused():
    pipe = Pipeline([REGISTRY["plan"](), RoundingPass(), REGISTRY["calibrate"]()])
    with pytest.raises(PreconditionError) as info:
        pipe.validate(frozenset({"calibration-data"}))
    assert "calibrate" in str(info.value) and "position 3" in str(info.value)


def test_data_free_pipeline_validates_without_data():
    parse_pipeline("canonicalize,fold-bn,plan").validate(frozenset())


# --------------------------------------------------------------------------- pass manager
class BreakWeights(Pass):
    """Claims to be exact but changes a weight: the numeric verifier must catch it."""

    name = "break-weights"
    summary = "changes a weight"

    def run(self, model, ctx):
        w = model.tensors()["w2"]
        w.values = np.asarray(w.values) * 2
        return PassResult(model, True)


class Crash(Pass):
    name = "crash"
    summary = "raises"

    def run(self, model, ctx):
        raise ZeroDivisionError("boom")


def test_numeric_verifier_catches_an_inexact_exact_pass():
    model = import_proto(conv_bn_relu_conv())
    mgr = PassManager(Pipeline([BreakWeights()]), [StructuralVerifier(), NumericVerifier()])
    with pytest.raises(VerificationError, match="break-weights"):
        mgr.run(model, PassContext())


def test_numeric_verifier_records_the_change_of_exact_passes():
    model = import_proto(conv_bn_relu_conv())
    mgr = PassManager(parse_pipeline("fold-bn"), [StructuralVerifier(), NumericVerifier()])
    _, records = mgr.run(model, PassContext())
    assert records[0].modified is True
    assert 0 <= records[0].stats["max_rel_change"] <= 1e-5


def test_foreign_exceptions_become_pass_errors_with_cause():
    with pytest.raises(PassError) as info:
        PassManager(Pipeline([Crash()])).run(import_proto(conv_bn_relu_conv()), PassContext())
    assert "crash" in str(info.value) and "boom" in str(info.value)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert info.value.pass_name == "crash"


def test_reproducer_saves_model_before_the_failing_pass(tmp_path):
    import onnx

    model = import_proto(conv_bn_relu_conv())
    pipe = Pipeline([REGISTRY["fold-bn"](), Crash(), REGISTRY["plan"]()])
    with pytest.raises(PassError):
        PassManager(pipe, reproducer=Reproducer(tmp_path / "repro")).run(model, PassContext())
    saved = onnx.load(str(tmp_path / "repro" / "before.onnx"))
    ops = [n.op_type for n in saved.graph.node]
    assert "BatchNormalization" not in ops  # fold-bn had run before the crash
    text = (tmp_path / "repro" / "pipeline.txt").read_text()
    assert text.splitlines()[0].startswith("crash,plan{")
    assert "boom" in text


@dataclass
class _Stale(Analysis):
    value: str = "stale"


@dataclass
class _AlsoStale(Analysis):
    value: str = "stale"


def test_analyses_are_invalidated_by_modifying_passes():
    ctx = PassContext()
    ctx.analyses.put(_Stale())
    ctx.analyses.put(_AlsoStale())
    PassManager(parse_pipeline("fold-bn")).run(import_proto(conv_bn_relu_conv()), ctx)
    assert len(ctx.analyses) == 0 and ctx.analyses.get(_Stale) is None


def test_preserved_analyses_survive_and_unmodified_runs_keep_everything():
    ctx = PassContext(calibration=None)
    stats = ActivationStats(0, {})
    ctx.analyses.put(stats)
    ctx.analyses.put(_Stale())
    model = import_proto(conv_bn_relu_conv())
    PassManager(parse_pipeline("plan")).run(model, ctx)  # plan modifies the table and preserves nothing
    assert len(ctx.analyses) == 0
    ctx.analyses.put(stats)
    ctx.analyses.put(_Stale())
    model, _ = PassManager(parse_pipeline("canonicalize")).run(model, ctx)  # nothing to do: not modified
    assert ctx.analyses.get(ActivationStats) is stats and ctx.analyses.get(_Stale) is not None


def test_a_pipeline_is_a_pass_and_nests():
    inner = parse_pipeline("fold-bn,plan")
    outer = Pipeline([REGISTRY["canonicalize"](), inner])
    assert str(outer) == "canonicalize,fold-bn,plan"
    assert [p.name for p in outer.flat()] == ["canonicalize", "fold-bn", "plan"]
    assert isinstance(inner, Pass) and parse_pipeline(outer.canonical()).canonical() == outer.canonical()
    result = outer.run(import_proto(conv_bn_relu_conv()), PassContext())
    assert result.modified and [s["pass"] for s in result.stats["passes"]] == ["canonicalize", "fold-bn,plan"]
    assert [s["pass"] for s in result.stats["passes"][1]["passes"]] == ["fold-bn", "plan"]
    assert len(result.model.quant.layers) == 2
    # What a nested pipeline preserves is what all its passes preserve.
    assert parse_pipeline("calibrate,embeddings").preserves == {ActivationStats, ChannelMeans}


def test_pass_records_and_metadata_from_optimize():
    model = conv_bn_relu_conv()
    result = qonnx.optimize(model, make_samples(model, 8), pipeline="fold-bn,plan,calibrate{method=minmax}")
    assert [r.name for r in result.records] == ["fold-bn", "plan", "calibrate"]
    assert all(r.seconds >= 0 for r in result.records)
    meta = {p.key: p.value for p in result.model.metadata_props}
    assert parse_pipeline(meta["qonnx.pipeline"]).canonical() == meta["qonnx.pipeline"]
    assert str(parse_pipeline(meta["qonnx.pipeline"])) == "fold-bn,plan,calibrate{method=minmax}"


# --------------------------------------------------------------------------- qonnx passes
def test_cli_passes_lists_every_registered_pass_option_and_preset():
    from qonnx.app.cli import main

    result = CliRunner().invoke(main, ["passes"])
    assert result.exit_code == 0, result.output
    for name, cls in REGISTRY.items():
        assert f"{name}: {cls.summary}" in result.output
        for f in dataclasses.fields(cls.Options):
            assert f.name in result.output
    for name in PRESETS:
        assert name in result.output
