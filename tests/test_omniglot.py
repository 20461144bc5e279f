"""Omniglot: the TFDS builder on the shared archives (without TensorFlow), its error paths, the
episode sampler, the conv net, prototypical networks and the baselines."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import ClosedJaxpr, Jaxpr
from numpyro.infer import Predictive

from bayesmeta import config, registry, run
from bayesmeta.adapt import InnerLoop
from bayesmeta.config import ConfigError
from bayesmeta.datasets import omniglot as data
from bayesmeta.diagnostics.landscape import landscape_metrics
from bayesmeta.fit import make_svi
from bayesmeta.models.baselines import global_labels
from bayesmeta.models.protonet import prototype_logits
from bayesmeta.nets import Conv4, batch_norm, broadcast_kernels, conv3x3, keep_shared, max_pool2x2, task_vmap
from bayesmeta.predict import predictive
from bayesmeta.registry import build_method, make_family
from bayesmeta.tasks.omniglot import rotate

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "omniglot"
OMNI = ["task.family='omniglot'", "model.likelihood='categorical'", "task.shots=1", "task.queries=2"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """A data directory prepared once for the module, from the shared archives only."""
    d = tmp_path_factory.mktemp("tfds")
    for cfg in ("minimal", "runs"):
        data.prepare(cfg, str(SHARED), str(d))
    return str(d)


def family(tfds_dir: str, *overrides: str):
    cfg = registry.load_config(None, [*OMNI, f"task.params.data_dir='{tfds_dir}'", *overrides])
    return make_family(cfg.task)


def probe_and_model_nll(method, probe, params, b, phi, inner_steps=2):
    """(the probe's mean query loss at its adapted phi, the model's query NLL at `params` after
    `inner_steps` inner steps), as one jitted program (eager conv ops compile one by one)."""
    from numpyro import handlers

    @jax.jit
    def nlls(params, b, phi):
        tr = handlers.trace(handlers.substitute(method.model, params)).get_trace(b, inner_steps=inner_steps)
        model_nll = -jnp.mean(tr["y"]["fn"].log_prob(tr["y"]["value"]))
        return jnp.mean(jax.vmap(probe.query_loss)(phi, b.x_query, b.y_query)), model_nll

    return nlls(params, b, phi)


def test_builder_prepares_and_reads_the_shared_archives_without_tensorflow(tmp_path):
    """In a fresh process on this environment, where TensorFlow is not installed (checked), prepare
    both configs in an empty data directory and read them back through tfds.data_source."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed: not this test"
        from bayesmeta.datasets import omniglot as data
        c = data.characters("minimal", 28, {str(SHARED)!r}, {str(tmp_path)!r})
        r = data.runs(28, {str(SHARED)!r}, {str(tmp_path)!r})
        b = data.prepare("minimal", "", {str(tmp_path)!r})
        sizes = [len(b.as_data_source(s)) for s in ("small1", "small2")]
        print("CHARS", len(c.images), len(set(c.label.tolist())), len(set(c.alphabet.tolist())), *sizes)
        print("RUNS", *r.support.shape, int(r.answer[0, 0]))
        assert not [k for k in sys.modules if k.split(".")[0] == "tensorflow"]
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.stdout.splitlines() if ln[:4] in ("CHAR", "RUNS")}
    # 5 + 5 alphabets with Greek and Latin shared: 242 characters x 20 drawers, 8 alphabets
    assert lines["CHARS"] == ["4840", "242", "8", "2720", "3120"]
    # run01/test/item01.png is class08 in run01/class_labels.txt (0-based 7)
    assert lines["RUNS"] == ["20", "20", "28", "28", "7"]
    assert (tmp_path / "bayesmeta_omniglot" / "minimal" / "1.0.0" / "dataset_info.json").is_file()


def test_answer_key_matches_the_archive(tfds_dir):
    r = data.runs(28, str(SHARED), tfds_dir)
    with zipfile.ZipFile(SHARED / "all_runs.zip") as z:
        for run_id in (1, 20):
            lines = z.read(f"run{run_id:02d}/class_labels.txt").decode().split()
            key = [int(Path(c).stem[5:]) - 1 for c in lines[1::2]]
            assert r.answer[run_id - 1].tolist() == key
    assert r.support.dtype == np.uint8 and r.support.max() == 255


def test_missing_archive_names_file_and_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    monkeypatch.delenv(data.ENV_ARCHIVES, raising=False)
    empty = tmp_path / "archives"
    empty.mkdir()
    with pytest.raises(data.DataError, match=r"all_runs\.zip not found; looked in: .*archives"):
        data.prepare("runs", str(empty), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / "bayesmeta_omniglot" / "runs" / "1.0.0").exists()


@pytest.mark.parametrize("damage", ["truncated", "bad_crc"])
def test_corrupt_archive_is_reported_and_writes_nothing(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    bad = tmp_path / "archives"
    bad.mkdir()
    raw = (SHARED / "all_runs.zip").read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:  # flip bytes inside the first stored image, so its CRC check fails
        with zipfile.ZipFile(SHARED / "all_runs.zip") as z:
            info = next(i for i in z.infolist() if i.filename.endswith(".png"))
        start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 10
        raw = raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 8]) + raw[start + 8 :]
    (bad / "all_runs.zip").write_bytes(raw)
    with pytest.raises(data.DataError, match="corrupt"):
        data.prepare("runs", str(bad), str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds" / "bayesmeta_omniglot" / "runs" / "1.0.0").exists()


def test_prepared_dataset_survives_a_corrupt_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    shutil.copy(SHARED / "all_runs.zip", good)
    (bad / "all_runs.zip").write_bytes(b"not a zip file")
    d = str(tmp_path / "tfds")
    n = len(data.prepare("runs", str(good), d).as_data_source("runs"))
    assert len(data.prepare("runs", str(bad), d).as_data_source("runs")) == n == 800


def test_concurrent_preparations_take_turns(tmp_path):
    """Two preparations of one config at once (two experiments started on a fresh machine) both
    return the prepared dataset; without the lock the second's rename into place fails."""
    d, start = str(tmp_path / "tfds"), threading.Barrier(2)
    data.builder_class()  # threads stand in for processes, which each register the class once

    def prepare() -> int:
        start.wait()
        return len(data.prepare("runs", str(SHARED), d).as_data_source("runs"))

    with ThreadPoolExecutor(2) as pool:
        sizes = [f.result() for f in [pool.submit(prepare) for _ in range(2)]]
    assert sizes == [800, 800]


def test_rotate_matches_numpy():
    img = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    for k in range(4):
        out = rotate(jnp.asarray(img), jnp.array([k, (k + 1) % 4]))
        np.testing.assert_array_equal(out[0], np.rot90(img[0], k))
        np.testing.assert_array_equal(out[1], np.rot90(img[1], (k + 1) % 4))


def test_episode_shapes_class_counts_and_no_query_in_support(tfds_dir):
    fam = family(tfds_dir, "task.params.ways=5", "task.shots=3", "task.queries=4")
    b = fam.sample(jax.random.PRNGKey(0), 16)
    assert b.x_support.shape == (16, 15, 784) and b.x_query.shape == (16, 20, 784)
    assert fam.y_dim == 5 and fam.query_points == 20
    for t in range(16):
        assert np.bincount(np.asarray(b.y_support[t]), minlength=5).tolist() == [3] * 5
        assert np.bincount(np.asarray(b.y_query[t]), minlength=5).tolist() == [4] * 5
        assert len(set(np.asarray(b.info["classes"][t]).tolist())) == 5  # N distinct classes
        s, q = np.asarray(b.x_support[t]), np.asarray(b.x_query[t])
        assert not (q[:, None, :] == s[None, :, :]).all(-1).any()  # no query image in the support set
    assert 0.0 <= float(b.x_support.min()) and float(b.x_support.max()) <= 1.0


def test_episodes_are_deterministic_from_the_key(tfds_dir):
    fam = family(tfds_dir)
    a, b = fam.sample(jax.random.PRNGKey(3), 4), fam.sample(jax.random.PRNGKey(3), 4)
    c = fam.sample(jax.random.PRNGKey(4), 4)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert not np.array_equal(a.info["classes"], c.info["classes"])


def _labels_by_class(b) -> dict[int, set[int]]:
    seen: dict[int, set[int]] = {}
    for t in range(b.info["classes"].shape[0]):
        for label, cls in enumerate(np.asarray(b.info["classes"][t]).tolist()):
            seen.setdefault(cls, set()).add(label)
    return seen


def test_label_regimes(tfds_dir):
    """Standard: a class gets different labels in different tasks. NME: always the same label, and
    each task holds one class of every label."""
    std = family(tfds_dir, "task.params.ways=5", "task.params.rotations=false")
    nme = family(tfds_dir, "task.params.ways=5", "task.params.rotations=false", "task.params.labels='nme'")
    key = jax.random.PRNGKey(0)
    assert max(len(v) for v in _labels_by_class(std.sample(key, 400)).values()) > 1
    seen = _labels_by_class(nme.sample(key, 400))
    assert all(len(v) == 1 for v in seen.values()) and len(seen) > 50
    groups = np.asarray(nme._nme_groups)
    assert groups.shape == (5, nme.n_classes // 5) and len(np.unique(groups)) == groups.size


def test_alphabet_split_and_config_errors(tfds_dir):
    train = family(tfds_dir)
    test = family(tfds_dir, "task.params.split='test'")
    chars = data.characters("minimal", 28, "", tfds_dir)
    test_alphabets = {chars.alphabet[np.asarray(test._pool)[i, 0]] for i in range(test.n_characters)}
    assert test_alphabets == {"Early_Aramaic", "Korean"}
    assert train.n_characters + test.n_characters == 242 and test.n_characters == 62
    assert train.n_classes == 4 * train.n_characters
    with pytest.raises(ConfigError, match=r"task.params.held_out: unknown alphabets \['Klingon'\]"):
        family(tfds_dir, "task.params.held_out=['Klingon']")
    with pytest.raises(ConfigError, match=r"task.shots: shots \+ queries must be <= 20"):
        family(tfds_dir, "task.shots=15", "task.queries=6")
    with pytest.raises(ConfigError, match=r"task.params.labels: expected one of"):
        family(tfds_dir, "task.params.labels='fixed'")


def test_conv3x3_equals_xla_convolution():
    """Channels-first patches times the kernel matrix is XLA's 'SAME' convolution, odd and even sides."""
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 5))
    for side in (8, 9):
        x = jax.random.normal(jax.random.PRNGKey(0), (3, side, side, 4))  # NHWC
        for stride in (1, 2):
            ref = jax.lax.conv_general_dilated(
                x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            got = conv3x3(x.transpose(3, 0, 1, 2), w, stride).transpose(1, 2, 3, 0)
            np.testing.assert_allclose(got, ref, atol=1e-4)


def _conv4_channels_last(net: Conv4, params: dict, x: jax.Array) -> jax.Array:
    """Conv4's function written independently: NHWC, XLA's convolution, two-pass batch norm."""
    h = x.reshape(x.shape[0], net.side, net.side, 1)
    for i in range(net.blocks):
        p = params[f"block_{i}"]
        h = jax.lax.conv_general_dilated(
            h, p["w"], (net.stride,) * 2, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
        h = jax.nn.relu((h - mean) / jnp.sqrt(var + 1e-5) * p["scale"] + p["offset"])
        if net.downsample == "maxpool":
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")
    return h.mean((1, 2)) @ params["head"]["w"] + params["head"]["b"]


def test_conv4_equals_a_channels_last_reference():
    """The channels-first net (one-pass batch norm) computes the textbook NHWC conv net, both downsamplings,
    with non-trivial batch-norm scales and offsets."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 784))
    for down in ("stride", "maxpool"):
        net = Conv4(784, 5, 8, downsample=down)
        params = net.init(jax.random.PRNGKey(0))
        params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape), params)
        np.testing.assert_allclose(net.apply(params, x), _conv4_channels_last(net, params, x), atol=1e-4)


def test_xla_convolution_option_gives_the_same_network():
    """model.net.conv = "xla" (for accelerators) computes what the default patches path computes."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (6, 784))
    for down in ("stride", "maxpool"):
        a, b = (Conv4(784, 5, 8, downsample=down, conv=c) for c in ("patches", "xla"))
        params = a.init(jax.random.PRNGKey(0))
        np.testing.assert_allclose(a.apply(params, x), b.apply(params, x), atol=1e-4)


def _dot_batch_dims(fn, *args) -> list:
    """The batch dimensions of every dot_general in fn's jaxpr (nested jaxprs included)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn.params["dimension_numbers"][1])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    if isinstance(sub, ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_shared_kernels_become_one_batched_matmul_with_the_same_values_and_gradients():
    """task_vmap with shared Conv4 parameters: each task gets its own copy of the 3x3 kernels (every
    conv matmul batched over tasks, so XLA need not transpose the patches), the dense head stays
    shared, and values and gradients are plain vmap's; XLA's convolution keeps the kernels shared."""
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 6, 784))
    net = Conv4(784, 5, 8, downsample="maxpool")
    params = net.init(jax.random.PRNGKey(0))

    def loss(fn, p):
        return jnp.sum(jnp.sin(fn(p)))

    ours = lambda p: task_vmap(net, net.apply, p, x)  # noqa: E731
    plain = lambda p: jax.vmap(lambda xi: net.apply(p, xi))(x)  # noqa: E731
    np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(plain)(params), rtol=1e-5, atol=1e-5)
    g_ours, g_plain = (jax.jit(jax.grad(lambda p, f=f: loss(f, p)))(params) for f in (ours, plain))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_ours, g_plain)

    tree, axes = net.shared_axes(params, 3)
    assert axes["block_0"]["w"] == 0 and tree["block_0"]["w"].shape == (3, 3, 3, 1, 8)
    assert axes["block_0"]["scale"] is None and axes["head"]["w"] is None
    batched = [dims for dims in _dot_batch_dims(ours, params) if dims != ((), ())]
    assert len(batched) >= net.blocks  # one batched kernel matmul per block (plain vmap has none)
    assert all(dims == ((), ()) for dims in _dot_batch_dims(plain, params))
    xla = Conv4(784, 5, 8, downsample="maxpool", conv="xla")
    assert xla.shared_axes(params, 3) == (params, None)


def test_inner_loop_from_a_shared_conv_init_lays_out_its_kernels_per_task():
    """The inner loop from one theta over a batch of tasks (MAML's first step) reads InnerLoop.layout
    (nets.shared_layout): for conv4's patches the kernels per task, with the adapted parameters and
    losses of the shared layout (keep_shared)."""
    cfg = registry.load_config(None, [*OMNI, "model.method='maml'", "model.net.kind='conv4'"])
    assert InnerLoop.from_config(cfg.model).layout is broadcast_kernels
    off = registry.load_config(None, [*OMNI, "model.net.kind='conv4'", "model.net.kernel_copies=false"])
    assert InnerLoop.from_config(off.model).layout is keep_shared
    assert InnerLoop.from_config(registry.load_config(None, []).model).layout is keep_shared
    net = Conv4(784, 5, 4)
    theta = net.init(jax.random.PRNGKey(0))
    x = jax.random.uniform(jax.random.PRNGKey(1), (3, 5, 784))
    y = jax.random.randint(jax.random.PRNGKey(2), (3, 5), 0, 5)

    def task_loss(p, xi, yi):
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(net.apply(p, xi)), yi[:, None], 1))

    (phi_a, loss_a), (phi_b, loss_b) = (
        jax.jit(lambda th, lay=layout: InnerLoop(steps=1, lr=0.4, layout=lay)(task_loss, th, x, y))(theta)
        for layout in (broadcast_kernels, keep_shared)
    )
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), phi_a, phi_b)
    assert phi_a["block_1"]["w"].shape == (3, 3, 3, 4, 4)


def test_max_pool_and_its_gradient_equal_reduce_window():
    """The reshape-and-max pooling is XLA's 'SAME' 2x2 reduce_window, value and gradient (tie-free
    inputs: at a tie the two pick different, equally valid, subgradients), on odd and even sides."""
    for shape in ((3, 2, 8, 8), (3, 2, 7, 5)):
        x = jax.random.permutation(jax.random.PRNGKey(0), jnp.arange(np.prod(shape), dtype=jnp.float32))
        x = x.reshape(shape) - x.size / 2  # negative values too: the padding must be -inf

        def ref(h):
            return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "SAME")

        np.testing.assert_array_equal(max_pool2x2(x), ref(x))
        weights = jax.random.normal(jax.random.PRNGKey(1), ref(x).shape)
        grads = [jax.grad(lambda h, f=f, v=weights: jnp.sum(v * f(h)))(x) for f in (max_pool2x2, ref)]
        np.testing.assert_array_equal(*grads)


def test_max_pool_gradient_after_batch_norm_is_the_reference_one_in_a_jitted_program():
    """Jitted, batch norm then pooling (a ProtoNet block): the gradient is reduce_window's, finite. With
    max(axis=...), whose gradient divides by the count of inputs equal to the stored maximum, XLA's
    -O0 (tests/conftest.py) recomputed batch norm in another fusion and made most of it 0 / 0."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 15, 4, 4))
    v = jax.random.normal(jax.random.PRNGKey(1), (8, 15, 2, 2))
    s, o = jnp.ones(8), jnp.zeros(8)

    def ref(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "SAME")

    ours, theirs = (
        jax.jit(jax.grad(lambda h, f=f: jnp.sum(v * f(batch_norm(h, s, o)))))(x) for f in (max_pool2x2, ref)
    )
    assert np.isfinite(np.asarray(ours)).all()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_batch_norm_uses_the_statistics_of_the_current_set():
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 6, 5, 5))  # (c, n, h, w)
    out = batch_norm(x, jnp.ones(4), jnp.zeros(4))
    np.testing.assert_allclose(out.mean((1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.var((1, 2, 3)), 1.0, atol=1e-3)
    # the one-pass variance holds its precision with the mean 10 sd away from 0
    far = batch_norm(20.0 + x, 2.0 * jnp.ones(4), jnp.ones(4))
    np.testing.assert_allclose(far, 2.0 * out + 1.0, atol=1e-3)
    net = Conv4(in_dim=28 * 28, out_dim=5, filters=8)
    params = net.init(jax.random.PRNGKey(0))
    imgs = jax.random.uniform(jax.random.PRNGKey(1), (10, 784))
    apply = jax.jit(net.apply)  # jitted: eager conv ops are slow
    assert apply(params, imgs).shape == (10, 5)
    assert jax.eval_shape(net.features, params, imgs).shape == (10, 8)
    # transductive: the same image is normalised with the statistics of the set it comes in
    assert not np.allclose(apply(params, imgs[:5])[0], apply(params, imgs)[0])


def test_prototype_logits_by_hand():
    z_s = jnp.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
    y_s = jnp.array([0, 0, 1])
    z_q = jnp.array([[1.0, 1.0]])
    # prototypes (1, 0) and (0, 4): squared distances 1 and 10
    np.testing.assert_allclose(prototype_logits(z_s, y_s, z_q, 2), [[-1.0, -10.0]])


def test_global_labels():
    classes = jnp.array([[7, 3, 9], [1, 2, 0]])
    y = jnp.array([[0, 2, 2, 1], [1, 1, 0, 2]])
    np.testing.assert_array_equal(global_labels(classes, y), [[7, 9, 9, 3], [2, 2, 1, 0]])


def test_nearest_neighbour_on_lakes_runs(tfds_dir):
    """The 1-NN method equals a direct numpy 1-NN on the runs (about 21 % at 28x28)."""
    cfg = registry.load_config(
        None,
        [
            "task.family='omniglot_runs'",
            "task.shots=1",
            "task.queries=1",
            f"task.params.data_dir='{tfds_dir}'",
            "model.method='nearest'",
            "model.likelihood='categorical'",
        ],
    )
    fam = make_family(cfg.task)
    method = build_method(cfg.model, fam.x_dim, fam.y_dim)
    b = fam.sample(jax.random.PRNGKey(0), 20)
    f = Predictive(method.model, params={}, num_samples=1, return_sites=["f"])(
        jax.random.PRNGKey(0), b._replace(y_query=None), inner_steps=0
    )["f"][0]
    d = ((np.asarray(b.x_query)[:, :, None] - np.asarray(b.x_support)[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.argmax(f, -1), np.argmin(d, -1))
    acc = float((np.argmin(d, -1) == np.asarray(b.y_query)).mean())
    assert 0.15 < acc < 0.3


SMALL_CONV = [
    *OMNI,
    "model.net.kind='conv4'",
    "model.net.filters=8",
    "train.meta_batch=4",
    "train.log_every=50",
    "train.eval_every=100",
    "train.checkpoint_every=100",
    "train.eval_tasks=20",
    "eval.tasks=40",
    "eval.batch=20",
    "eval.plot_tasks=0",
    "eval.memorization_tasks=0",
    "eval.task.params.split='test'",
]


def _small(tfds_dir: str, *overrides: str) -> config.Config:
    return registry.load_config(None, [*SMALL_CONV, f"task.params.data_dir='{tfds_dir}'", *overrides])


def test_protonet_learns_and_evaluates_at_another_way(tfds_dir, tmp_path):
    """A small ProtoNet trained 5-way beats chance clearly on held-out alphabets, and the same
    parameters evaluate 10-way (its parameters do not depend on the number of classes)."""
    cfg = _small(
        tfds_dir,
        "model.method='protonet'",
        "model.net.downsample='maxpool'",
        "train.steps=200",
        "eval.task.params.ways=10",
        "eval.inner_steps=[0]",
    )
    _, metrics = run.train(cfg, tmp_path / "proto", progress=False)
    acc = metrics["metrics"]["accuracy@0"]["mean"]
    assert acc > 0.35, acc  # chance is 0.1
    rel = metrics["reliability"]["0"]  # ECE and reliability of the predictive class probabilities
    assert rel["accuracy"] == pytest.approx(acc, abs=1e-6)  # the same points, pooled: equal counts per task
    assert 0 <= rel["ece"] <= 1 and rel["diverged_tasks"] == 0
    assert (tmp_path / "proto" / "plots" / "reliability_0.png").is_file()
    summary = (tmp_path / "proto" / "summary.md").read_text()
    assert "## Calibration of the predictive class probabilities" in summary
    setup = run.restore(cfg, tmp_path / "proto")[0]
    assert (setup.family.y_dim, setup.eval_family.y_dim) == (5, 10)
    assert setup.eval_method is not setup.method  # built for 10 outputs, same parameters


def test_a_method_without_an_inner_loop_predicts_with_xlas_convolution(tfds_dir):
    """run.forward_only: ProtoNet trains with the patches but evaluates with XLA's convolution op (only
    its program has one; the two nets compute the same, test_xla_convolution_option_gives_the_same_network);
    MAML, whose evaluation differentiates, keeps the patches in both."""
    cfg = _small(tfds_dir, "model.method='protonet'", "model.net.downsample='maxpool'")
    setup = run.Setup.from_config(cfg)
    svi = make_svi(setup.method, cfg.train)
    key = jax.random.PRNGKey(2)
    batch = jax.eval_shape(lambda k: setup.family.sample(k, 2), key)  # lowered abstractly: nothing runs
    params = jax.eval_shape(lambda k, b: svi.get_params(svi.init(k, b)), key, batch)
    train, test = (predictive(m, 1, 1, ("f",)) for m in (setup.method, setup.eval_method))
    assert "convolution" not in train.lower(params, batch, key).as_text()
    assert "convolution" in test.lower(params, batch, key).as_text()
    maml = run.Setup.from_config(_small(tfds_dir))
    assert maml.eval_method is maml.method and maml.cfg.model.net.conv == "patches"


def test_maml_cannot_be_evaluated_at_another_way(tfds_dir):
    with pytest.raises(ConfigError, match="depend on the number of outputs"):
        run.Setup.from_config(_small(tfds_dir, "eval.task.params.ways=10"))


def test_finetune_pretrains_on_global_labels_and_adapts_a_zero_head(tfds_dir):
    cfg = _small(tfds_dir, "model.method='finetune'", "model.adapt='head'")
    setup = run.Setup.from_config(cfg)
    assert setup.family.n_classes == 720
    b = setup.family.sample(jax.random.PRNGKey(0), 2)
    params = run.param_shapes(setup.method, setup.family)
    assert params["theta.head.w"].shape == (8, 720)
    from numpyro import handlers

    init = {k: jnp.zeros(v.shape) for k, v in params.items()}
    y = jax.jit(
        lambda p, b: handlers.trace(handlers.substitute(setup.method.model, p)).get_trace(b)["y"]["value"]
    )
    np.testing.assert_array_equal(y(init, b)[:, :5], global_labels(b.info["classes"], b.y_support))
    predict = Predictive(setup.method.model, params=init, num_samples=1, return_sites=["f"])
    f = jax.jit(lambda k, b: predict(k, b, inner_steps=0)["f"])(
        jax.random.PRNGKey(0), b._replace(y_query=None)
    )
    np.testing.assert_allclose(f, 1 / 5)  # the fresh head is zero: uniform class probabilities


def _finetune_probe_setup(tfds_dir: str, *overrides: str) -> tuple[run.Setup, dict]:
    """Head-adapting fine-tuning (2 inner steps) and its parameters drawn N(0, 0.1^2)."""
    cfg = _small(tfds_dir, "model.method='finetune'", "model.adapt='head'", "model.inner_steps=2", *overrides)
    setup = run.Setup.from_config(cfg)
    shapes = run.param_shapes(setup.method, setup.family)
    keys = jax.random.split(jax.random.PRNGKey(1), len(shapes))
    params = {
        k: 0.1 * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, shapes.items(), strict=True)
    }
    return setup, params


def test_finetune_probe_is_the_test_time_adaptation(tfds_dir):
    """Fine-tuning's probe starts from the pre-trained body with a zero head, and its adapted query loss
    is the model's predictive NLL after model.inner_steps steps (conv blocks); the landscape metrics of
    the same probe are finite (on an MLP body: the second-order programs of conv blocks take ~25 s to
    compile, and the probe does not depend on the kind of net)."""
    setup, params = _finetune_probe_setup(tfds_dir)
    b = setup.family.sample(jax.random.PRNGKey(0), 3)
    probe = setup.method.probe(params)
    assert probe.theta["head"]["w"].shape == (8, 5) and not np.any(probe.theta["head"]["w"])
    phi = jax.jit(probe.adapt)(probe.theta, b.x_support, b.y_support)  # jitted: eager conv ops are slow
    assert np.any(phi["head"]["w"])  # the head moved
    body = phi["block_0"]["w"]  # per task: the body did not move
    np.testing.assert_array_equal(body, np.broadcast_to(params["theta.block_0.w"], body.shape))
    np.testing.assert_allclose(*probe_and_model_nll(setup.method, probe, params, b, phi), rtol=1e-5)
    mlp, params = _finetune_probe_setup(tfds_dir, "model.net.kind='mlp'", "model.net.hidden=[8]")
    probe = mlp.method.probe(params)
    assert probe.theta["head"]["w"].shape == (8, 5) and not np.any(probe.theta["head"]["w"])
    out = jax.jit(lambda b, k: landscape_metrics(probe, b, k, 3))(b, jax.random.PRNGKey(2))
    assert out and all(bool(jnp.isfinite(v)) for v in out.values()), out


def test_mr_maml_w_on_conv_encoder(tfds_dir):
    cfg = _small(tfds_dir, "model.method='mr_maml_w'", "model.params.rho_init=-5.0")
    setup = run.Setup.from_config(cfg)
    shapes = run.param_shapes(setup.method, setup.family)
    assert shapes["encoder.block_0.loc"].shape == (3, 3, 1, 8)  # stochastic conv kernels
    assert shapes["encoder_bias.block_0.scale"].shape == (8,)  # deterministic batch-norm parameters
    assert shapes["head.head.w"].shape == (8, 5)
    assert float(setup.method.kl({k: jnp.full(v.shape, -5.0) for k, v in shapes.items()})) > 0


def test_mr_maml_w_probe_on_conv_encoder_is_the_model_at_the_posterior_mean(tfds_dir):
    """The landscape probe of MR-MAML(W) with conv blocks (batch-norm leaves beside the stochastic
    kernels): its adapted query loss is the model's NLL with every kernel at its posterior mean."""
    cfg = _small(tfds_dir, "model.method='mr_maml_w'", "model.inner_steps=2")
    setup = run.Setup.from_config(cfg)
    shapes = run.param_shapes(setup.method, setup.family)
    keys = jax.random.split(jax.random.PRNGKey(1), len(shapes))
    params = {
        k: 0.1 * jax.random.normal(kk, v.shape) for kk, (k, v) in zip(keys, shapes.items(), strict=True)
    }
    b = setup.family.sample(jax.random.PRNGKey(0), 3)
    probe = setup.method.probe(params)
    phi = jax.jit(probe.adapt)(probe.theta, b.x_support, b.y_support)  # jitted: eager conv ops are slow
    at_mean = {**params, **{k[: -len(".loc")]: v for k, v in params.items() if k.endswith(".loc")}}
    np.testing.assert_allclose(*probe_and_model_nll(setup.method, probe, at_mean, b, phi), rtol=1e-5)


def test_context_counts_classes_and_query_points(tfds_dir):
    setup = run.Setup.from_config(_small(tfds_dir, "model.method='finetune'"))
    assert setup.family.query_points == 10  # 5 ways x 2 queries: the bound's K
    assert run.param_shapes(setup.method, setup.family)["theta.head.w"].shape[1] == setup.family.n_classes


def _rezip(src: Path, dst: Path, top: str, skip: tuple[str, ...] = ()) -> None:
    """Copy an archive's images under a new top folder (the layout of the full archives)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            parts = name.split("/")
            if name.endswith(".png") and parts[1] not in skip:
                zout.writestr("/".join([top, *parts[1:]]), zin.read(name))


def test_full_source_tests_on_the_evaluation_archive(tmp_path, monkeypatch):
    """The full config reads images_background.zip and images_evaluation.zip (stand-ins built from the
    minimal sets here) and the test split is exactly the evaluation archive's characters."""
    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    arch = tmp_path / "archives"
    arch.mkdir()
    _rezip(SHARED / "images_background_small1.zip", arch / "images_background.zip", "images_background")
    _rezip(
        SHARED / "images_background_small2.zip",
        arch / "images_evaluation.zip",
        "images_evaluation",
        skip=("Greek", "Latin"),
    )
    over = [f"task.params.archives='{arch}'", f"task.params.data_dir='{tmp_path / 'tfds'}'"]
    cfg = registry.load_config(None, [*OMNI, "task.params.source='full'", *over])
    train = make_family(cfg.task)
    test = make_family(
        registry.load_config(
            None, [*OMNI, "task.params.source='full'", "task.params.split='test'", *over]
        ).task
    )
    assert (train.n_characters, test.n_characters) == (136, 106)  # small1; small2 without Greek, Latin
    assert test.sample(jax.random.PRNGKey(0), 2).x_support.shape == (2, 5, 784)


def test_cli_reports_a_missing_archive_in_one_line(tmp_path, monkeypatch, capsys):
    from bayesmeta import cli

    monkeypatch.setattr(data, "DEFAULT_DIRS", ())
    monkeypatch.delenv(data.ENV_ARCHIVES, raising=False)
    empty = tmp_path / "archives"
    empty.mkdir()
    sets = [f"task.params.archives='{empty}'", f"task.params.data_dir='{tmp_path / 'tfds'}'", *OMNI]
    argv = ["fit", "--run-dir", str(tmp_path / "run"), "--no-progress"]
    code = cli.main([*argv, *(a for kv in sets for a in ("--set", kv))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "images_background_small1.zip not found; looked in:" in err[0] and str(empty) in err[0]
