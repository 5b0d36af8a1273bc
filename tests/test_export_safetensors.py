"""`jattn export --format safetensors`: for each model family the exported tensors, loaded with
the `safetensors` package alone, rebuild the Flax variables whose output equals the
checkpoint's `predict`; incomplete exports and unwritable outputs are refused in one line."""

import json
import os
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from jattn.cli import main
from jattn.config import load_config, with_defaults
from jattn.export.formats import ExportError, export_safetensors, load_safetensors
from jattn.train.checkpoint import Checkpointer
from jattn.train.setup import init_batch
from jattn.train.state import create_state
from jattn.train.task import Task, build_task, make_optimizer, register_task
from jattn.train.steps import Update
from task_helpers import task_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "export.md"


def _filled(shapes, low, high, seed):
    """Arrays of `shapes` (ShapeDtypeStructs) drawn uniformly from [low, high)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: rng.uniform(low, high, s.shape).astype(s.dtype), shapes)


def _workdir(path: pathlib.Path, config, step: int = 3):
    """A workdir holding one checkpoint of `config`'s task at `step` and its saved config;
    returns (workdir, task, state). Random values in the task's init structure (no compiled
    init): params in [-0.3, 0.3), every other variable in [0.5, 1.5) (positive variances;
    EMA weights and statistics unlike the trained ones)."""
    config = with_defaults(config)
    task = build_task(config)
    params, variables = jax.eval_shape(task.init, jax.random.key(0), init_batch(config, task.fields))
    params, variables = _filled(params, -0.3, 0.3, 0), _filled(variables, 0.5, 1.5, 1)
    state = create_state(params, task.optimizers, jax.random.key(int(config.seed)), variables)
    saved = {**json.loads(json.dumps(config.to_dict())), "jattn": {"version": "test"}}
    ckpt = Checkpointer(path / "checkpoints", async_save=False)
    try:
        ckpt.save(step, state, config=saved)
    finally:
        ckpt.close()
    return path, task, state


def _load(path) -> tuple[dict, dict]:
    """(nested variables, metadata) read with the safetensors package only: names split at
    "/", except those whose key path the metadata's "paths" gives."""
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    paths = json.loads(metadata["paths"])
    nested: dict = {}
    for name, value in load_file(str(path)).items():
        node = nested
        *parents, leaf = paths.get(name, name.split("/"))
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested, metadata


def _assert_same_tree(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _export(workdir, out, **kwargs):
    meta = export_safetensors(workdir, out, **kwargs)
    assert meta["verified_max_abs_diff"] == 0.0
    return _load(out)


# --------------------------------------------------------------------------- model families


@pytest.fixture(scope="module")
def sagan_track(tmp_path_factory):
    """Conditional SAGAN with an EMA generator that tracks its own batch-norm statistics."""
    config = load_config(CONFIGS / "demo_sagan.py")
    config.model.update({"ch": 4, "z_dim": 8, "num_classes": 3, "ema_decay": 0.5, "ema_stats": "track"})
    return _workdir(tmp_path_factory.mktemp("sagan"), config)


def _sagan_generator(meta):
    from jattn.models.sagan import SAGANGenerator

    m = json.loads(meta["model"])
    return SAGANGenerator(json.loads(meta["image_size"]), m["ch"], m["z_dim"], m["num_classes"], 16, m["bn_momentum"])


def _sagan_batch(n=2):
    from jattn.train.tasks.sagan import sample_latents

    labels = jnp.arange(n, dtype=jnp.int32) % 3
    return {"image": jnp.zeros((n, 32, 32, 3)), "label": labels}, sample_latents(jnp.arange(n), 8), labels


def test_sagan_exports_the_ema_generator_with_its_statistics(sagan_track, tmp_path):
    workdir, task, state = sagan_track
    variables, meta = _export(workdir, tmp_path / "g.safetensors")
    assert meta["weights"] == "ema" and meta["network"] == "generator" and meta["batch_norm"] == "running"
    assert json.loads(meta["collections"]) == ["batch_stats", "params"] and set(variables) == {"params", "batch_stats"}
    _assert_same_tree(variables["params"], state.variables["generator_ema"])
    _assert_same_tree(variables["batch_stats"], state.variables["generator_ema_stats"]["batch_stats"])
    names = load_file(str(tmp_path / "g.safetensors"))
    assert "batch_stats/attention/g/sn/conv/kernel/u" in names  # spectral-norm vectors
    assert json.loads(meta["paths"])["batch_stats/attention/g/sn/conv/kernel/sigma"][-1] == "conv/kernel/sigma"
    batch, z, y = _sagan_batch()
    got = _sagan_generator(meta).apply(variables, z, y, train=False)
    np.testing.assert_allclose(got, task.predict(state.params, state.variables, batch)["output"], rtol=0, atol=1e-6)


def test_sagan_trained_weights_on_request(sagan_track, tmp_path):
    workdir, _, state = sagan_track
    variables, meta = _export(workdir, tmp_path / "g.safetensors", weights="trained")
    assert meta["weights"] == "trained"
    _assert_same_tree(variables["params"], state.params["generator"])
    _assert_same_tree(variables["batch_stats"], state.variables["generator"]["batch_stats"])
    with pytest.raises(ExportError, match="weights must be one of ema, trained, got 'last'"):
        export_safetensors(workdir, tmp_path / "x.safetensors", weights="last")


def test_the_cli_chooses_the_weights(sagan_track, tmp_path, capsys):
    workdir, _, state = sagan_track
    out = tmp_path / "g.safetensors"
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(out),
                 "--weights", "trained"]) == 0
    assert json.loads(capsys.readouterr().out)["weights"] == "trained"
    _assert_same_tree(load_safetensors(out)[0]["params"], state.params["generator"])
    code = main(["export", "--workdir", str(workdir), "--format", "jax-export", "--output", str(tmp_path / "g.jax"),
                 "--weights", "ema"])
    assert code == 2 and "--weights applies to safetensors exports, not jax-export" in capsys.readouterr().err


def test_sagan_ema_normalised_with_batch_statistics(tmp_path):
    config = load_config(CONFIGS / "demo_sagan.py")
    config.model.update({"ch": 4, "z_dim": 8, "num_classes": 3, "ema_decay": 0.5, "ema_stats": "batch"})
    workdir, task, state = _workdir(tmp_path / "w", config)
    variables, meta = _export(workdir, tmp_path / "g.safetensors")
    assert meta["weights"] == "ema" and meta["batch_norm"] == "batch"
    _assert_same_tree(variables["params"], state.variables["generator_ema"])
    _assert_same_tree(variables["batch_stats"], state.variables["generator"]["batch_stats"])  # the SN vectors
    batch, z, y = _sagan_batch()
    got, _ = _sagan_generator(meta).apply(variables, z, y, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, task.predict(state.params, state.variables, batch)["output"], rtol=0, atol=1e-6)


SE_RESNET = {"name": "se_resnet", "stage_sizes": (1, 1), "num_classes": 3, "width": 8, "bottleneck": False,
             "cifar_stem": True, "reduction": 4}
UNET = {"name": "attention_unet", "num_classes": 3, "features": (4, 8, 16)}


@pytest.fixture(scope="module")
def se_resnet(tmp_path_factory):
    return _workdir(tmp_path_factory.mktemp("se_resnet"), task_config(SE_RESNET, image_size=16))


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    return _workdir(tmp_path_factory.mktemp("unet"), task_config(UNET, image_size=16))


def test_se_resnet_exports_batch_norm_statistics(se_resnet, tmp_path):
    from jattn.train.tasks.classify import build_se_resnet

    workdir, task, state = se_resnet
    variables, meta = _export(workdir, tmp_path / "m.safetensors")
    assert meta["network"] == "model" and meta["weights"] == "trained" and meta["batch_norm"] == "running"
    _assert_same_tree(variables["batch_stats"], state.variables["model"]["batch_stats"])
    image = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    model = build_se_resnet(with_defaults(task_config(SE_RESNET, image_size=16)).model)
    got = model.apply(variables, image, train=False)
    expected = task.predict(state.params, state.variables, {"image": image, "label": np.zeros(2, np.int32)})["output"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_attention_unet_exports_batch_norm_statistics(unet, tmp_path):
    from jattn.models.unet import AttentionUNet

    workdir, task, state = unet
    variables, meta = _export(workdir, tmp_path / "m.safetensors")
    assert json.loads(meta["collections"]) == ["batch_stats", "params"]
    _assert_same_tree(variables["batch_stats"], state.variables["model"]["batch_stats"])
    image = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    got = AttentionUNet(3, (4, 8, 16)).apply(variables, image, train=False)
    batch = {"image": image, "segmentation": np.zeros((2, 16, 16), np.int32)}
    np.testing.assert_allclose(got, task.predict(state.params, state.variables, batch)["output"], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """The self-attention inpainting GAN (widths 4, 8, 16 at 16 x 16): a generator of params only."""
    config = task_config({"name": "sa_inpaint", "widths": (4, 8, 16), "critic_widths": (4, 8),
                          "spectral_norm": True}, image_size=16,
                         optimizer={"generator": {}, "critic": {}})
    return _workdir(tmp_path_factory.mktemp("inpainting"), config)


def test_inpainting_generator_round_trip(inpainting, tmp_path):
    from jattn.models.sa_inpaint import SAInpaintGenerator

    workdir, task, state = inpainting
    variables, meta = _export(workdir, tmp_path / "g.safetensors")
    assert set(variables) == {"params"} and meta["network"] == "generator" and "batch_norm" not in meta
    _assert_same_tree(variables["params"], state.params["generator"])  # the critic's SN vectors stay out
    rng = np.random.default_rng(3)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16, 1), np.float32)
    mask[:, 4:10, 5:12] = 1.0
    raw = SAInpaintGenerator((4, 8, 16)).apply(variables, image, mask)
    expected = task.predict(state.params, state.variables, {"image": image, "mask": mask})["output"]
    np.testing.assert_allclose(raw * mask + image * (1 - mask), expected, rtol=0, atol=1e-6)


def _hole_batch(size: int, seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
    mask = np.zeros((1, size, size, 1), np.float32)
    mask[:, size // 4 : size // 2, size // 4 : 3 * size // 4] = 1.0
    return {"image": image, "mask": mask}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_deepfill_generator_round_trip(version, tmp_path):
    """DeepFill's generator (cnum 4, 32 x 32): the file alone, applied with the model class
    as a user would, gives the checkpoint generator's output (the export itself checked
    that `predict` with only its tensors equals the checkpoint's)."""
    from jattn.models.deepfill import DeepFillV1Generator
    from jattn.models.deepfill_v2 import DeepFillV2Generator

    name, gen = {"v1": ("deepfill_v1", DeepFillV1Generator), "v2": ("deepfill_v2", DeepFillV2Generator)}[version]
    config = task_config({"name": name, "cnum": 4, "critic_cnum": 4, }, image_size=32,
                         optimizer={"generator": {}, "critic": {}})
    workdir, task, state = _workdir(tmp_path / "run", config)
    variables, meta = _export(workdir, tmp_path / "g.safetensors")
    assert set(variables) == {"params"} and meta["network"] == "generator"
    _assert_same_tree(variables["params"], state.params["generator"])
    batch = _hole_batch(32)
    x_in = batch["image"] * (1 - batch["mask"])
    apply = jax.jit(gen(cnum=4).apply)  # one program for both: equal inputs give equal bits
    got, want = (apply(v, x_in, batch["mask"]) for v in (variables, {"params": state.params["generator"]}))
    _assert_same_tree(got, want)


def test_rcan_round_trip(tmp_path):
    from jattn.models.rcan import RCAN

    config = load_config(CONFIGS / "demo_rcan.py")
    config.model.update({"n_resgroups": 2, "n_resblocks": 1, "n_feats": 8, "reduction": 4})
    workdir, _, state = _workdir(tmp_path / "run", config)
    variables, meta = _export(workdir, tmp_path / "m.safetensors")
    assert set(variables) == {"params"} and meta["network"] == "model"
    _assert_same_tree(variables["params"], state.params["model"])
    m, scale = config.model, int(config.data.scale)
    model = RCAN(scale, n_resgroups=2, n_resblocks=1, n_feats=8, reduction=4, non_local=bool(m.non_local),
                 res_scale=float(m.res_scale), rgb_mean=None if m.rgb_mean is None else tuple(m.rgb_mean))
    lowres = np.random.default_rng(6).uniform(-1, 1, (1, 12, 12, 3)).astype(np.float32)
    apply = jax.jit(model.apply)
    np.testing.assert_array_equal(apply(variables, lowres), apply({"params": state.params["model"]}, lowres))


# --------------------------------------------------------------------------- bytes, refusals, outputs


def test_the_same_checkpoint_exports_to_the_same_bytes(inpainting, tmp_path):
    workdir = inpainting[0]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    export_safetensors(workdir, a)
    export_safetensors(workdir, b, verify=False)
    assert a.read_bytes() == b.read_bytes()
    n = int.from_bytes(a.read_bytes()[:8], "little")
    header = a.read_bytes()[8 : 8 + n].decode()
    metadata = json.loads(header)["__metadata__"]
    assert list(metadata) == sorted(metadata) and header.index('"__metadata__"') < header.index('"params/')
    assert n % 8 == 0


class _Scaled(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.BatchNorm(use_running_average=not train)(nn.Conv(3, (1, 1))(x))


@register_task("export_test_two_networks")
def _two_networks(config):
    """Inference reads a second network beside the exported one: its export is incomplete."""
    net = _Scaled()

    def init(key, batch):
        v = net.init(key, batch["image"], train=False)
        return {"model": v["params"], "scale": {"s": jnp.ones(())}}, {"model": {"batch_stats": v["batch_stats"]}}

    def predict(params, variables, batch):
        out = net.apply({"params": params["model"], **variables["model"]}, batch["image"], train=False)
        return {"output": out * params["scale"]["s"]}

    def loss(params, variables, batch, key):
        return jnp.mean(predict(params, variables, batch)["output"] ** 2), ({}, {})

    tx = make_optimizer(config.optimizer, config.learning_rate)
    return Task("export_test_two_networks", init, {"model": tx, "scale": tx}, (Update("m", "model", loss, tx),),
                predict, fields=(), export_network="model")


def test_an_incomplete_export_is_refused(tmp_path, capsys):
    config = task_config({"name": "export_test_two_networks"}, image_size=8)
    workdir, _, _ = _workdir(tmp_path / "w", config)
    out = tmp_path / "m.safetensors"
    with pytest.raises(ExportError, match="would not reproduce the model: its inference reads more than the model's"):
        export_safetensors(workdir, out)
    assert main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "would not reproduce the model" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ExportError, match=r"keeps no EMA of the model .* export weights='trained'"):
        export_safetensors(workdir, out, weights="ema")


def _cli_error(capsys, workdir, output) -> str:
    code = main(["export", "--workdir", str(workdir), "--format", "safetensors", "--output", str(output)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_unwritable_outputs_are_one_line_errors(inpainting, tmp_path, capsys, monkeypatch):
    workdir = inpainting[0]
    (tmp_path / "folder").mkdir()
    assert "is a folder" in _cli_error(capsys, workdir, tmp_path / "folder")
    (tmp_path / "file").write_text("x")
    assert "file is a file, not a folder" in _cli_error(capsys, workdir, tmp_path / "file" / "sub" / "g.safetensors")
    assert (tmp_path / "file").read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if not os.access(ro, os.W_OK):  # as root every folder is writable: the write below stands in
            assert "is not writable" in _cli_error(capsys, workdir, ro / "g.safetensors")
    finally:
        ro.chmod(0o755)
    # a write that fails half-way (here: the file system refuses it) leaves nothing behind
    def refuse(self, data):
        pathlib.Path.touch(self)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(pathlib.Path, "write_bytes", refuse)
    assert "cannot write the export (Permission denied)" in _cli_error(capsys, workdir, tmp_path / "g.safetensors")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "ro"]


# --------------------------------------------------------------------------- the documented PyTorch layout


def _documented_snippet() -> str:
    """The docs' python block that converts an export to PyTorch's layout."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    return next(b for b in blocks if "def torch_layout" in b)


def _run_snippet(workdir, folder: pathlib.Path) -> dict:
    """Export `workdir` to folder/exports/model.safetensors and run the docs' snippet there."""
    (folder / "exports").mkdir(parents=True)
    export_safetensors(workdir, folder / "exports" / "model.safetensors")
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(_documented_snippet(), scope)  # noqa: S102 - the documented code itself
    finally:
        os.chdir(cwd)
    return scope


def _torch_conv2d(x_nchw, w_oihw, pad):
    """PyTorch's Conv2d (stride 1, symmetric zero padding): cross-correlation with OIHW weights."""
    return np.asarray(jax.lax.conv_general_dilated(x_nchw, w_oihw, (1, 1), [(pad, pad)] * 2,
                                                   dimension_numbers=("NCHW", "OIHW", "NCHW")))


def _torch_conv_transpose2d(x_nchw, w_iohw, bias):
    """PyTorch's ConvTranspose2d with kernel = stride, padding 0:
    out[n, o, y * k + i, x * k + j] = sum_c x[n, c, y, x] * w[c, o, i, j] + bias[o]."""
    n, _, h, w = x_nchw.shape
    _, o, k, _ = w_iohw.shape
    out = np.einsum("ncyx,coij->noyixj", x_nchw, w_iohw).reshape(n, o, h * k, w * k)
    return out + bias[None, :, None, None]


def test_documented_pytorch_layout(unet, se_resnet, tmp_path):
    rng = np.random.default_rng(4)
    scope = _run_snippet(unet[0], tmp_path / "unet")
    tensors, state = scope["tensors"], scope["state"]
    assert set(state) == set(tensors) and scope["model_config"]["name"] == "attention_unet"
    for name, w in tensors.items():
        if name.startswith("batch_stats/") or not name.endswith("/kernel"):
            np.testing.assert_array_equal(state[name], w)
    # a 3x3 convolution ("SAME", stride 1 = PyTorch's padding 1), NHWC in Flax, NCHW in PyTorch
    kernel = tensors["params/enc1/conv1/kernel"]
    assert state["params/enc1/conv1/kernel"].shape == (8, 4, 3, 3)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    flax_out = nn.Conv(8, (3, 3), padding="SAME", use_bias=False).apply({"params": {"kernel": kernel}}, x)
    torch_out = _torch_conv2d(x.transpose(0, 3, 1, 2), state["params/enc1/conv1/kernel"], 1)
    np.testing.assert_allclose(torch_out.transpose(0, 2, 3, 1), flax_out, rtol=1e-5, atol=1e-5)
    # the 2x2 stride-2 transposed convolution of the decoder: the kernel is flipped, then [in, out, H, W]
    up = {"kernel": tensors["params/up0/kernel"], "bias": tensors["params/up0/bias"]}
    assert state["params/up0/kernel"].shape == (8, 4, 2, 2)
    g = rng.normal(size=(2, 4, 4, 8)).astype(np.float32)
    flax_up = nn.ConvTranspose(4, (2, 2), strides=(2, 2)).apply({"params": up}, g)
    torch_up = _torch_conv_transpose2d(g.transpose(0, 3, 1, 2), state["params/up0/kernel"], state["params/up0/bias"])
    np.testing.assert_allclose(torch_up.transpose(0, 2, 3, 1), flax_up, rtol=1e-5, atol=1e-5)
    assert not np.allclose(state["params/up0/kernel"], tensors["params/up0/kernel"].transpose(2, 3, 0, 1))
    # the classifier's dense head: PyTorch's Linear computes x @ weight.T + bias
    scope = _run_snippet(se_resnet[0], tmp_path / "se_resnet")
    tensors, state = scope["tensors"], scope["state"]
    head = {"kernel": tensors["params/head/kernel"], "bias": tensors["params/head/bias"]}
    assert state["params/head/kernel"].shape == (3, head["kernel"].shape[0])
    f = rng.normal(size=(5, head["kernel"].shape[0])).astype(np.float32)
    flax_fc = nn.Dense(3).apply({"params": head}, f)
    np.testing.assert_allclose(f @ state["params/head/kernel"].T + state["params/head/bias"], flax_fc,
                               rtol=1e-5, atol=1e-5)
