"""`jattn compile`: ahead-of-time compilation of a run's step for a TPU topology (libtpu's
compiler on this CPU) or for the local devices; its report, its FLOP count, its programs
per step against the loop's, its collectives, and its errors."""

import contextlib
import io
import json
import os

# libtpu takes a lock file when it starts; with no TPU chip here there is nothing to guard, and
# pytest -n 2 runs these tests in two processes (`jattn compile` sets this itself).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jattn import cli
from jattn.cli import main
from jattn.train import aot
from jattn.train.steps import Update
from jattn.train.task import Task, make_optimizer, register_task
from toy import toy_config

TOPOLOGY = "v5e:2x2"  # 4 chips
COLLECTIVES = ["all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all"]

needs_libtpu = pytest.mark.skipif(not aot.libtpu_installed(), reason="libtpu not installed (pip install 'jattn[tpu]')")


def _config_file(tmp_path, **fields) -> str:
    """A config file of the toy GAN (tests/toy.py: 2 critic updates + 1 generator update,
    16x16), `fields` set in it (`model__name="toy_classifier"`: c.model.name = ...)."""
    path = tmp_path / "toy_config.py"
    sets = "".join(f"    c.{k.replace('__', '.')} = {v!r}\n" for k, v in fields.items())
    path.write_text(f"from toy import toy_config\n\n\ndef get_config():\n    c = toy_config()\n{sets}    return c\n")
    return str(path)


def _run(args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def toy_report(tmp_path_factory):
    """`jattn compile` of the toy GAN for v5e:2x2, run once for the tests below."""
    tmp = tmp_path_factory.mktemp("compile")
    code, out, err = _run(["compile", "--config", _config_file(tmp), "--topology", TOPOLOGY,
                           "--json", str(tmp / "report.json")])
    assert code == 0, err
    return json.loads((tmp / "report.json").read_text()), out


# --------------------------------------------------------------------------- the report


@needs_libtpu
def test_report_fields_and_types(toy_report):
    report, out = toy_report
    assert list(report) == ["topology", "chip", "chips", "global_batch", "per_chip_batch", "compute_dtype",
                            "programs_per_step", "programs", "step"]
    assert (report["topology"], report["chip"], report["chips"]) == (TOPOLOGY, "TPU v5 lite", 4)
    assert (report["global_batch"], report["per_chip_batch"], report["compute_dtype"]) == (8, 2, "float32")
    assert [p["name"] for p in report["programs"]] == ["train_step", "inference"]  # toy_gan inpaints: has a mask
    assert [p["runs_per_step"] for p in report["programs"]] == [1, 0]
    for p in report["programs"]:
        assert list(p) == ["name", "runs_per_step", "compile_seconds", "flops_per_chip", "bytes_per_chip",
                           "hbm_gib_per_chip", "collectives"]
        assert isinstance(p["compile_seconds"], float) and p["compile_seconds"] > 0
        assert isinstance(p["flops_per_chip"], float) and p["flops_per_chip"] > 0
        assert isinstance(p["bytes_per_chip"], float) and p["bytes_per_chip"] > 0
        mem = p["hbm_gib_per_chip"]
        assert list(mem) == ["arguments", "outputs", "temporaries", "total"]
        assert all(isinstance(v, float) and v >= 0 for v in mem.values())
        assert mem["total"] <= mem["arguments"] + mem["outputs"] + mem["temporaries"]
        assert list(p["collectives"]) == COLLECTIVES and all(isinstance(v, int) for v in p["collectives"].values())
    step = report["step"]
    assert list(step) == ["flops_per_chip", "bytes_per_chip", "hbm_gib_per_chip", "fits", "estimated_seconds",
                          "bound", "estimated_images_per_second"]
    train_step = report["programs"][0]
    assert step["flops_per_chip"] == train_step["flops_per_chip"]  # inference runs 0 times per step
    assert step["hbm_gib_per_chip"] == train_step["hbm_gib_per_chip"]["total"]
    assert step["fits"] is True and step["bound"] in ("compute", "memory")
    # the roofline with v5e's figures: max(flops / 197 TFLOP/s, bytes / 819 GB/s)
    expected = max(step["flops_per_chip"] / 197e12, step["bytes_per_chip"] / 819e9)
    assert step["estimated_seconds"] == pytest.approx(expected)
    assert step["estimated_images_per_second"] == pytest.approx(8 * 3 / expected)  # 3 updates, 8 images each
    assert "train_step" in out and "roofline estimate" in out and "flatters a float32 step" in out


@needs_libtpu
def test_programs_per_step_is_what_the_loop_dispatches(toy_report, tmp_path, monkeypatch):
    """Count the loop's calls of the step program(s) per step, and compare."""
    from jattn.train import loop

    calls = []

    def counting(*args, **kwargs):
        fn = make(*args, **kwargs)

        def step(*a, **k):
            calls.append(1)
            return fn(*a, **k)

        return step

    class NoLogs:  # the logs are not under test (and TensorBoard's writer imports TensorFlow)
        def __init__(self, *args, **kwargs):
            pass

        scalars = images = close = __init__

    make = loop.make_train_step
    monkeypatch.setattr(loop, "make_train_step", counting)
    monkeypatch.setattr(loop, "MetricWriter", NoLogs)
    config = toy_config(total=3)
    config.image_every = config.checkpoint_every = 0
    rng = np.random.default_rng(0)
    host = iter(lambda: {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
                         "mask": np.ones((8, 16, 16, 1), np.float32)}, None)
    loop.train(config, tmp_path, data_iter=host, progress=False)
    report, _ = toy_report
    assert len(calls) / config.total_steps == report["programs_per_step"] == 1


@needs_libtpu
def test_collectives_of_the_toy_gan(toy_report):
    """The step writes every update out (the default): one all-reduce per network update,
    each carrying the gradient of the network it updates, and nothing else crosses chips.
    The inference program needs none."""
    report, _ = toy_report
    step, inference = report["programs"]
    assert step["collectives"] == {"all-reduce": 3, "all-gather": 0, "reduce-scatter": 0, "collective-permute": 0,
                                   "all-to-all": 0}
    assert sum(inference["collectives"].values()) == 0


@needs_libtpu
def test_scanned_step_has_one_all_reduce_per_loop_body():
    """`step_unroll=False` runs the critic's two updates as one `lax.scan`, whose body
    the program text holds once: 2 all-reduces (critic body + generator)."""
    config = toy_config()
    config.step_unroll = False
    scanned = aot.compile_run(config, aot.topology_devices(TOPOLOGY), TOPOLOGY).report
    assert scanned["programs"][0]["collectives"] == {"all-reduce": 2, "all-gather": 0, "reduce-scatter": 0,
                                                     "collective-permute": 0, "all-to-all": 0}


# --------------------------------------------------------------------------- FLOPs by hand

K, DEPTH = 16 * 16 * 3, 4  # a flattened 16x16 image, through one [K, K] weight DEPTH times


@register_task("aot_matmul")
def _matmul_task(config):
    """A linear autoencoder of one shared bias-free weight W [K, K] applied DEPTH times:
    loss = mean((x W^DEPTH - x)^2); `repeats` updates per step (> 1: one `lax.scan`)."""

    def init(key, batch):
        return {"net": {"w": jax.random.normal(key, (K, K)) / K**0.5}}, {}

    def loss_fn(params, variables, batch, key):
        x = h = batch["image"].reshape(batch["image"].shape[0], -1)
        for _ in range(DEPTH):
            h = h @ params["net"]["w"]
        return jnp.mean((h - x) ** 2), ({}, {})

    tx = make_optimizer(config.optimizer)
    update = Update("train", "net", loss_fn, tx)
    return Task("aot_matmul", init, {"net": tx}, (update,) * int(config.model.repeats),
                lambda params, variables, batch: {"output": batch["image"]}, fields=())


@needs_libtpu
def test_flops_of_a_matmul_model_match_the_count_by_hand():
    """Per chip, b examples: forward DEPTH products h W (2bK^2 each); backward a weight
    gradient for each (2bK^2) and an input gradient for all but the first, whose input x
    needs none: 2bK^2 (3 DEPTH - 1) per update. XLA counts 2MNK per [M, K] x [K, N] product
    (float32 at default precision too, not per bf16 pass) and 1 per element of an
    elementwise op: Adam, the gradient norm, the finiteness selects and the loss add about
    25 per parameter and a few per input element, 0.5% here. Two updates per step: written
    out (the default) XLA counts both; as a scan (`step_unroll=False`) XLA counts the loop
    body once and `jattn compile` adds it again. Either way the count doubles."""
    devices = aot.topology_devices(TOPOLOGY)
    config = toy_config()
    config.model = ml_collections.ConfigDict({"name": "aot_matmul", "repeats": 2})
    config.batch_size = 4 * 256
    b = config.batch_size // 4
    by_hand = 2 * 2 * b * K * K * (3 * DEPTH - 1)
    for unroll in (True, False):
        config.step_unroll = unroll
        report = aot.compile_run(config, devices, TOPOLOGY).report
        assert [p["name"] for p in report["programs"]] == ["train_step"]  # no mask: no inference program
        assert report["step"]["flops_per_chip"] == pytest.approx(by_hand, rel=0.01)
        assert report["step"]["flops_per_chip"] > by_hand


# --------------------------------------------------------------------------- local devices


def test_local_devices_report_no_fit_or_estimate(tmp_path):
    config = _config_file(tmp_path, model__name="toy_classifier")  # one update, no inference program: quick
    code, out, err = _run(["compile", "--config", config, "--topology", "local", "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["chip"], report["chips"], report["per_chip_batch"]) == ("cpu", 8, 1)
    assert report["programs_per_step"] == 1 and report["step"]["flops_per_chip"] > 0
    assert report["step"]["hbm_gib_per_chip"] > 0
    step = report["step"]
    assert step["fits"] is step["estimated_seconds"] is step["bound"] is step["estimated_images_per_second"] is None
    assert "no published figures for chip 'cpu'" in out


# --------------------------------------------------------------------------- errors


@needs_libtpu
@pytest.mark.parametrize("name", ["v9:2x2", "v5e:3x3", "foo", "v5litepod-16", ""])
def test_unknown_topology_is_a_one_line_error(tmp_path, capsys, name):
    assert main(["compile", "--config", _config_file(tmp_path), "--topology", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("jattn compile: error: unknown topology")


@needs_libtpu
def test_batch_that_does_not_divide_by_the_chips(tmp_path, capsys):
    assert main(["compile", "--config", _config_file(tmp_path), "--topology", TOPOLOGY, "--batch-size", "6"]) == 2
    assert "global batch 6 does not divide by the 4 chips" in capsys.readouterr().err


def test_missing_libtpu_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(aot, "libtpu_installed", lambda: False)
    assert main(["compile", "--config", _config_file(tmp_path), "--topology", TOPOLOGY]) == 2
    assert "pip install 'jattn[tpu]'" in capsys.readouterr().err


def test_unknown_config_key(tmp_path, capsys):
    assert main(["compile", "--config", _config_file(tmp_path), "--topology", TOPOLOGY, "--set", "batch_sise=4"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def _wide_task(name: str, width: int):
    """One [K, width] float32 weight trained with Adam: the weight, its two moments and the
    update's new copies (the finite check selects between old and new state)."""

    @register_task(name)
    def task(config):
        def init(key, batch):
            return {"net": {"w": jnp.zeros((K, width))}}, {}

        def loss_fn(params, variables, batch, key):
            x = batch["image"].reshape(batch["image"].shape[0], -1)
            return jnp.mean((x @ params["net"]["w"]) ** 2), ({}, {})

        tx = make_optimizer(config.optimizer)
        return Task(name, init, {"net": tx}, (Update("train", "net", loss_fn, tx),),
                    lambda params, variables, batch: {"output": batch["image"]}, fields=())

    return task


_wide_task("aot_huge", 1 << 21)  # a 6 GiB weight: 30 GiB per step, never fits a v5e's 16 GiB
_wide_task("aot_vast", 1 << 22)  # 12 GiB: the TPU compiler cannot lay the step out at all


@needs_libtpu
def test_a_step_the_tpu_compiler_refuses_does_not_fit(tmp_path, capsys):
    """XLA's TPU compiler refuses a program larger than the HBM; `jattn compile` compiles
    it again without that check to report what it would need. --require-fit: exit 1."""
    config = _config_file(tmp_path, model__name="aot_huge", batch_size=4)
    args = ["compile", "--config", config, "--topology", TOPOLOGY, "--json", str(tmp_path / "r.json"), "--require-fit"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "DOES NOT FIT: the step needs 30.00 GiB of HBM per chip" in err
    assert "the TPU compiler refused it (RESOURCE_EXHAUSTED" in out
    step = json.loads((tmp_path / "r.json").read_text())["step"]
    assert step["fits"] is False and step["hbm_gib_per_chip"] == pytest.approx(30, rel=0.01)


@needs_libtpu
def test_a_step_the_tpu_compiler_cannot_lay_out_does_not_fit(tmp_path, capsys):
    """Far beyond the HBM even the compile without the HBM check fails: the report still
    comes, with the arguments' size (weight and two Adam moments: 36 GiB) as what is known."""
    config = _config_file(tmp_path, model__name="aot_vast", batch_size=4)
    args = ["compile", "--config", config, "--topology", TOPOLOGY, "--json", str(tmp_path / "r.json"), "--require-fit"]
    assert main(args) == 1
    out, err = capsys.readouterr()
    assert "than the compiler can lay out (its arguments alone take 36.00 GiB)" in err
    assert "could not lay it out even without the HBM check" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["step"]["fits"] is False and report["step"]["hbm_gib_per_chip"] is None
    assert report["programs"][0]["flops_per_chip"] is None


@needs_libtpu
def test_a_step_larger_than_the_chip_table_says_does_not_fit(tmp_path, capsys, monkeypatch):
    """A v5e with 1 KiB of HBM: exit 0 with "fits": false and a loud line on stderr. Also
    the --config.KEY=VALUE override form."""
    tiny = aot.Chip("TPU v5e", 197e12, 1024, 819e9, "test")
    monkeypatch.setattr(aot, "CHIPS", {**aot.CHIPS, "TPU v5 lite": tiny})
    config = _config_file(tmp_path, model__name="toy_classifier")
    args = ["compile", "--config", config, "--topology", TOPOLOGY, "--config.batch_size=4",
            "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    assert "DOES NOT FIT" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["step"]["fits"] is False and report["global_batch"] == 4


def test_require_fit_needs_a_known_chip(tmp_path, capsys):
    assert main(["compile", "--config", _config_file(tmp_path), "--topology", "local", "--require-fit"]) == 2
    assert "--require-fit: no HBM figure for chip 'cpu'" in capsys.readouterr().err


# --------------------------------------------------------------------------- pieces


def test_collectives_are_counted_by_opcode():
    hlo = "\n".join([
        "%all-reduce.3 = f32[8]{0:T(128)} add(%a, %b), metadata={op_name=\"all-reduce(x)\"}",
        "%ar = (f32[], f32[8]{0:T(128)S(1)}) all-reduce(%x, %y), channel_id=1, to_apply=%sum",
        "%ars = f32[4]{0} all-reduce-start(%z), to_apply=%sum",
        "%ard = f32[4]{0} all-reduce-done(%ars)",
        "ROOT %ag = bf16[16,2]{1,0:T(8,128)(2,1)} all-gather(%p), dimensions={0}",
        "%cp = (f32[2], f32[2], u32[], u32[]) collective-permute-start(%q), source_target_pairs={{0,1}}",
        "%cpd = f32[2] collective-permute-done(%cp)",
        "%rs = f32[2]{0} reduce-scatter(%r), dimensions={0}",
        "%a2a = f32[2,2]{1,0} all-to-all(%s), dimensions={0}",
        "%f = f32[2] fusion(%all-gather.1), kind=kLoop, calls=%all-to-all.fused",
    ])
    assert aot.count_collectives(hlo) == {"all-reduce": 2, "all-gather": 1, "reduce-scatter": 1,
                                          "collective-permute": 1, "all-to-all": 1}


def test_cost_analysis_as_dict_or_list():
    class Fake:
        def __init__(self, costs):
            self.costs = costs

        def cost_analysis(self):
            return self.costs

    costs = {"flops": 6.0, "bytes accessed": 10.0, "utilization0{}": 1.0}
    assert aot.cost_of(Fake(costs)) == aot.cost_of(Fake([costs])) == (6.0, 10.0)


def test_step_summary():
    programs = [{"name": "train_step", "runs_per_step": 1, "flops_per_chip": 4e12, "bytes_per_chip": 1e9,
                 "hbm_gib_per_chip": {"total": 15.0}},
                {"name": "inference", "runs_per_step": 0, "flops_per_chip": 1e15, "bytes_per_chip": 1e15,
                 "hbm_gib_per_chip": {"total": 99.0}}]
    chip = aot.CHIPS["TPU v5 lite"]
    step = aot.step_summary(programs, chip, images_per_step=96)
    assert (step["flops_per_chip"], step["hbm_gib_per_chip"], step["fits"]) == (4e12, 15.0, True)
    assert step["estimated_seconds"] == pytest.approx(4e12 / 197e12) and step["bound"] == "compute"
    assert step["estimated_images_per_second"] == pytest.approx(96 * 197 / 4)
    assert aot.step_summary(programs, chip, 96, refused=True)["fits"] is False  # the compiler's word counts
    assert aot.step_summary(programs, None, 96)["fits"] is None


def test_aot_platforms_setting():
    env = {}
    cli._aot_platforms(env, jax_imported=False, tpu_chips=0)
    assert env == {"JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    env = {"JAX_PLATFORMS": "tpu"}
    cli._aot_platforms(env, jax_imported=False, tpu_chips=4)  # a TPU VM: libtpu's lock stays
    assert env == {"JAX_PLATFORMS": "tpu"}  # the user's choice stands
    env = {}
    cli._aot_platforms(env, jax_imported=True, tpu_chips=0)  # JAX started here (conftest: cpu): kept
    assert jax.config.jax_platforms == "cpu" and env == {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


@needs_libtpu
def test_deepfill_v1_step_lowered_for_tpu_takes_no_cpu_kernel():
    """DeepFill v1's training step (every update, critics' gradient penalty included),
    lowered for a TPU topology with the CPU kernels switched on, is plain XLA: the same
    convolutions and products as with them off, no custom calls, no loops. Lowered for the
    CPU, the same step does take the kernels (another count of XLA convolutions: a
    polyphase gradient is several stride-1 convolutions, a Winograd layer none)."""
    import collections
    import re

    from jattn.config import load_config
    from jattn.ops.conv import cpu_kernels
    from jattn.train.setup import abstract_step_batches, abstract_train_state
    from jattn.train.sharding import make_mesh
    from jattn.train.steps import make_train_step
    from jattn.train.task import build_task

    # widths of 24/48 on 64x64 crops: Winograd, space-to-depth, polyphase and narrow layers
    # one critic update: the other four of the paper's five are the same program
    config = load_config("configs/demo.py", ["model.cnum=24", "model.critic_cnum=24", "batch_size=4", "n_critic=1"])
    task = build_task(config)

    def ops(devices) -> collections.Counter:
        mesh = make_mesh(devices)
        state = abstract_train_state(task, config, mesh)
        batches = abstract_step_batches(task, config, mesh, 4)
        with jax.set_mesh(mesh):
            text = make_train_step(task.updates, mesh).lower(state, batches).as_text()
        return collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", text))

    tpu = aot.topology_devices(TOPOLOGY)
    with cpu_kernels(True):
        tpu_on, cpu_on = ops(tpu), ops(jax.devices("cpu")[:1])
    with cpu_kernels(False):
        tpu_off = ops(tpu)
    assert not {"custom_call", "while"} & set(tpu_on)
    for op in ("convolution", "dot_general"):
        assert tpu_on[op] == tpu_off[op], op
    assert tpu_on["convolution"] > 100 and cpu_on["convolution"] != tpu_on["convolution"]


@needs_libtpu
@pytest.mark.slow  # about a minute of TPU compilation on 2 cores
def test_attention_rcnn_step_compiles_for_a_tpu_topology(tmp_path):
    """The detector's whole training step (anchor and RoI sampling, NMS while loops, RoIAlign
    on four levels, the attention) compiles for v5e:2x2 data-parallel, and fits."""
    code, out, err = _run(["compile", "--config", "demo_attention_rcnn", "--topology", TOPOLOGY,
                           "--json", str(tmp_path / "r.json")])
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    step = report["step"]
    assert report["global_batch"] == 16 and step["fits"] is True
    (program,) = [p for p in report["programs"] if p["runs_per_step"]]
    assert program["collectives"]["all-reduce"] >= 1 and step["flops_per_chip"] > 0
