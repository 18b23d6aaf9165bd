"""The GAN on its own: every loss and architecture takes real training steps."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.core.params import Params
from pipeline.data.mnist import load_split
from pipeline.training.dataset import make_dataset
from pipeline.training.distribute import set_up
from pipeline.training.gan import GAN, METRICS
from pipeline.training.optimizers import FusedAdam

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("arch", "loss", "d_steps"),
    [("mlp", "minimax", 1), ("mlp", "wgan_gp", 2), ("mlp", "hinge", 1), ("dcgan", "wgan_gp", 1)],
)
def test_every_loss_and_architecture_trains(
    smoke_params: Params, mnist_dir: Path, arch: str, loss: str, d_steps: int
) -> None:
    """Two steps of each combination: finite metrics, and both nets moved."""
    params = smoke_params.model_copy(
        update={
            "model": smoke_params.model.model_copy(update={"arch": arch}),
            "loss": smoke_params.loss.model_copy(update={"kind": loss, "d_steps": d_steps}),
            "train": smoke_params.train.model_copy(update={"batch_size": 16}),
        }
    )
    gan = GAN(params, tf.distribute.get_strategy(), 100)
    before = [net.get_weights()[0].copy() for net in (gan.generator, gan.discriminator)]
    images, labels = load_split(mnist_dir, "train")
    dataset = make_dataset(images, labels, 16, params.model.output, params.seed, limit=64)
    sums, done = gan.train_block(iter(dataset), tf.constant(2))
    assert int(done) == 2 and np.isfinite(sums.numpy()).all()
    after = [net.get_weights()[0] for net in (gan.generator, gan.discriminator)]
    assert all(not np.array_equal(b, a) for b, a in zip(before, after, strict=True))


def _ema_gan(smoke_params: Params, decay: float) -> GAN:
    keras.utils.set_random_seed(smoke_params.seed)  # the same initial weights every time
    params = smoke_params.model_copy(
        update={"train": smoke_params.train.model_copy(update={"ema_decay": decay})}
    )
    return GAN(params, tf.distribute.get_strategy(), 100)


def _batches(params: Params, mnist_dir: Path) -> Any:
    images, labels = load_split(mnist_dir, "train")
    return iter(make_dataset(images, labels, 64, params.model.output, params.seed, limit=512))


def test_ema_tracks_the_generator_weights_as_decay_says(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """ema starts as a copy of G, then ema <- d * ema + (1 - d) * w after every step."""
    decay, gan = 0.75, _ema_gan(smoke_params, 0.75)
    assert gan.generator_ema is not None and gan.shipped is gan.generator_ema
    expected = gan.generator.get_weights()
    np.testing.assert_array_equal(gan.generator_ema.get_weights()[0], expected[0])
    batches = _batches(smoke_params, mnist_dir)
    for _ in range(3):  # one step per block, so the weights after each step can be read
        gan.train_block(batches, tf.constant(1))
        weights = gan.generator.get_weights()
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
        assert not np.allclose(expected[0], weights[0])  # it lags behind: a real average
    for want, got in zip(expected, gan.generator_ema.get_weights(), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_ema_off_adds_nothing_and_on_leaves_the_training_unchanged(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """decay 0: no average, G itself ships. decay > 0: G and D take exactly the same steps
    (the average only reads them), so it can be switched on without changing a run."""
    off, on = _ema_gan(smoke_params, 0.0), _ema_gan(smoke_params, 0.9)
    assert off.generator_ema is None and off.shipped is off.generator
    for gan in (off, on):
        gan.train_block(_batches(smoke_params, mnist_dir), tf.constant(3))
    for net in ("generator", "discriminator"):
        for a, b in zip(
            getattr(off, net).get_weights(), getattr(on, net).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_the_average_is_the_same_in_one_block_or_several(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """Each step's average runs at the start of the next step, and a block's last one after
    its loop: three steps in one block leave exactly the average of three blocks of one."""
    whole, parts = _ema_gan(smoke_params, 0.75), _ema_gan(smoke_params, 0.75)
    whole.train_block(_batches(smoke_params, mnist_dir), tf.constant(3))
    batches = _batches(smoke_params, mnist_dir)
    for _ in range(3):
        parts.train_block(batches, tf.constant(1))
    assert whole.generator_ema is not None and parts.generator_ema is not None
    for a, b in zip(
        whole.generator_ema.get_weights(), parts.generator_ema.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def _gan_with(
    smoke_params: Params,
    steps: int = 100,
    mode_seeking: float = 0.0,
    minibatch_std: int = 0,
    r1: float = 0.0,
    r1_every: int = 1,
    **train: Any,
) -> GAN:
    keras.utils.set_random_seed(smoke_params.seed)  # the same initial weights every time
    loss = {"mode_seeking": mode_seeking, "r1": r1, "r1_every": r1_every}
    params = smoke_params.model_copy(
        update={
            "model": smoke_params.model.model_copy(update={"d_minibatch_std": minibatch_std}),
            "train": smoke_params.train.model_copy(update=train),
            "loss": smoke_params.loss.model_copy(update=loss),
        }
    )
    return GAN(params, tf.distribute.get_strategy(), steps)


@pytest.mark.parametrize(
    ("shards", "mode_seeking", "minibatch_std", "r1"),
    [(2, 0.0, 0, 0.0), (4, 0.0, 0, 0.0), (2, 0.1, 4, 0.0), (2, 0.0, 0, 1.0)],
)
def test_shards_compute_the_same_steps_as_one_batch(
    smoke_params: Params,
    mnist_dir: Path,
    shards: int,
    mode_seeking: float,
    minibatch_std: int,
    r1: float,
) -> None:
    """train.shards splits each batch into independent parts (one core each on CPU) and sums
    their gradients: the same maths as one batch, up to float rounding. The mode-seeking
    term's pairs (adjacent rows) and the minibatch-stddev feature's groups (within blocks of
    consecutive rows) are the same in both; so is the lazy R1 term (on steps 1 and 3)."""
    loss = {"mode_seeking": mode_seeking, "minibatch_std": minibatch_std, "r1": r1}
    whole = _gan_with(smoke_params, shards=1, r1_every=2, **loss)
    split = _gan_with(smoke_params, shards=shards, r1_every=2, **loss)
    initial = whole.generator.get_weights()[0].copy()
    sums = [gan.train_block(_batches(smoke_params, mnist_dir), tf.constant(3))[0].numpy()
            for gan in (whole, split)]  # fmt: skip
    np.testing.assert_allclose(sums[1], sums[0], rtol=1e-4)
    assert not np.allclose(whole.generator.get_weights()[0], initial)  # three real steps
    for net in ("generator", "discriminator"):
        for a, b in zip(
            getattr(whole, net).get_weights(), getattr(split, net).get_weights(), strict=True
        ):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def _step_graph(gan: GAN, batch: int) -> Any:
    """The graph of one training step on a batch of ``batch`` images."""
    spec = [tf.TensorSpec([batch, 28, 28, 1]), tf.TensorSpec([batch], tf.int32)]
    return tf.function(gan.train_step).get_concrete_function(*spec).graph


def _reads_per_weight(gan: GAN, batch: int) -> dict[str, int]:
    """How often one training step's graph reads each trainable weight of the nets."""
    graph = _step_graph(gan, batch)
    captured = {id(inside): outside for outside, inside in graph.captures}
    names = {
        id(variable.value.handle): f"{net.name}/{variable.path}"
        for net in (gan.generator, gan.discriminator)
        for variable in net.trainable_variables
    }
    reads = dict.fromkeys(names.values(), 0)
    for op in graph.get_operations():
        outside = captured.get(id(op.inputs[0])) if op.type == "ReadVariableOp" else None
        if outside is not None and id(outside) in names:
            reads[names[id(outside)]] += 1
    return reads


def test_a_step_reads_each_weight_once_per_update_it_feeds(smoke_params: Params) -> None:
    """Two shards, each calling G in D's step and in G's, and D in both: G's weights are read
    once a step (G is not updated before its own step), D's twice (before and after its
    update), not once per call and shard: under mixed precision each read is one bfloat16
    copy of the weight (per-call reads made 8 copies of each weight a step)."""
    gan = _gan_with(smoke_params, shards=2, batch_size=16)
    reads = _reads_per_weight(gan, 16)
    assert {name: count for name, count in reads.items() if name.startswith("generator/")}
    assert all(reads[name] == (1 if name.startswith("generator/") else 2) for name in reads), reads


def _waits_for(op: tf.Operation) -> set[str]:
    """The names of the ops that ``op`` waits for, through inputs and control inputs."""
    seen: set[str] = set()
    todo = [op]
    while todo:
        node = todo.pop()
        for parent in [x.op for x in node.inputs] + list(node.control_inputs):
            if parent.name not in seen:
                seen.add(parent.name)
                todo.append(parent)
    return seen


def test_g_step_waits_for_d_gradients(smoke_params: Params) -> None:
    """G's step starts once D's gradients are in, so its forward pass runs beside D's Adam
    update instead of delaying D's step: of G's forward GEMMs (two shards, in D's step and in
    G's), G's step's half waits for D's gradient GEMMs, D's step's half does not."""
    graph = _step_graph(_gan_with(smoke_params, shards=2, batch_size=16), 16)
    forward = [op for op in graph.get_operations()
               if op.type == "MatMul" and op.name.startswith("generator")]  # fmt: skip
    waiting = [op for op in forward
               if any(re.match(r"gradient_tape/discriminator.*MatMul", name)
                      for name in _waits_for(op))]  # fmt: skip
    assert forward and len(waiting) == len(forward) // 2, [op.name for op in waiting]


def test_state_the_nets_update_as_they_run_moves_every_step(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """The nets compute inside Keras' stateless scope (their weights read once), which holds
    back assignments: G's batch-norm statistics and D's dropout seeds (dcgan) must still be
    written back, so each moves at every step."""
    keras.utils.set_random_seed(smoke_params.seed)
    params = smoke_params.model_copy(
        update={
            "model": smoke_params.model.model_copy(update={"arch": "dcgan"}),
            "train": smoke_params.train.model_copy(update={"batch_size": 16, "shards": 2}),
        }
    )
    gan = GAN(params, tf.distribute.get_strategy(), 100)
    state = [v for net in (gan.generator, gan.discriminator) for v in net.non_trainable_variables]
    assert any("moving_mean" in v.path for v in state) and any("seed" in v.path for v in state)
    images, labels = load_split(mnist_dir, "train")
    batches = iter(make_dataset(images, labels, 16, params.model.output, params.seed, limit=64))
    seen = [[v.numpy().copy() for v in state]]
    for _ in range(2):
        gan.train_block(batches, tf.constant(1))
        seen.append([v.numpy().copy() for v in state])
    for before, after in itertools.pairwise(seen):
        moved = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
        assert all(moved), [v.path for v, m in zip(state, moved, strict=True) if not m]


def test_minibatch_std_groups_must_fit_in_a_slice(smoke_params: Params) -> None:
    """Blocks of 2 x group rows may not straddle two slices: said before any weight exists.
    The conv nets have no such feature, so the same batch is fine for them."""

    def params(arch: str) -> Params:
        model = smoke_params.model.model_copy(update={"d_minibatch_std": 8, "arch": arch})
        train = smoke_params.train.model_copy(update={"batch_size": 48, "shards": 2})
        return smoke_params.model_copy(update={"model": model, "train": train})

    message = "train.batch_size: got 48; must be a multiple of 32 (1 replicas of strategy "
    with (
        pytest.raises(ValueError, match=re.escape(message) + ".*model.d_minibatch_std"),
        set_up(params("mlp")),
    ):
        pass
    with set_up(params("dcgan")) as strategy:
        assert strategy.num_replicas_in_sync == 1


def test_mode_seeking_adds_its_term_to_gs_loss(smoke_params: Params, mnist_dir: Path) -> None:
    """From the same weights and batch, G's first loss with the term (weight 1) exceeds the
    plain one by more than half a unit (the term is positive, 1 / ratio); D's does not move."""
    sums = []
    for weight in (0.0, 1.0):
        gan = _gan_with(smoke_params, mode_seeking=weight)
        sums.append(gan.train_block(_batches(smoke_params, mnist_dir), tf.constant(1))[0].numpy())
    metrics = {name: index for index, name in enumerate(METRICS)}
    assert sums[1][metrics["d_loss"]] == sums[0][metrics["d_loss"]]  # D steps first, unchanged
    assert sums[1][metrics["g_loss"]] > sums[0][metrics["g_loss"]] + 0.5


def test_r1_adds_its_term_to_ds_loss_on_due_updates_only(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """From the same weights and batch, D's first loss (update 0: due) grows by the R1 term,
    twice as much when it is taken on every 2nd update (weighted x2); on update 1 (not due
    with r1_every 2) the step is bit-identical to one without it."""
    losses = {}
    for r1, every in ((0.0, 1), (1.0, 1), (1.0, 2)):
        gan = _gan_with(smoke_params, r1=r1, r1_every=every)
        sums = gan.train_block(_batches(smoke_params, mnist_dir), tf.constant(1))[0].numpy()
        losses[r1, every] = sums[METRICS.index("d_loss")]
    term = losses[1.0, 1] - losses[0.0, 1]
    assert term > 1e-4
    np.testing.assert_allclose(losses[1.0, 2] - losses[0.0, 1], 2 * term, rtol=1e-3)

    weights = []
    for r1 in (0.0, 1.0):
        gan = _gan_with(smoke_params, r1=r1, r1_every=2)
        gan.d_opt.iterations.assign(1)
        gan.train_block(_batches(smoke_params, mnist_dir), tf.constant(1))
        weights.append(gan.discriminator.get_weights())
    for plain, lazy in zip(*weights, strict=True):
        np.testing.assert_array_equal(lazy, plain)


def test_fused_adam_takes_keras_adams_steps() -> None:
    """FusedAdam (one kernel per variable) follows Keras' Adam, bias correction included."""
    rng = np.random.default_rng(0)
    start, grads = rng.normal(size=(64, 32)), [rng.normal(size=(64, 32)) for _ in range(5)]
    weights = []
    for optimizer in (FusedAdam(1e-2, beta_1=0.5), keras.optimizers.Adam(1e-2, beta_1=0.5)):
        variable = keras.Variable(start.astype("float32"))
        for grad in grads:
            optimizer.apply([tf.constant(grad, tf.float32)], [variable])
        weights.append(variable.numpy())
    assert not np.allclose(weights[0], start, atol=1e-2)  # five steps of 1e-2 moved it
    np.testing.assert_allclose(weights[0], weights[1], rtol=1e-5, atol=1e-6)


def test_lr_decay_holds_then_falls_linearly_to_zero_at_the_end(
    smoke_params: Params, mnist_dir: Path
) -> None:
    """train.lr_decay 0.5 over a 4-step run: full rates for steps 1-3, half for step 4 (of
    its linear fall over steps 3-4), zero after the run's end, so further steps move
    nothing. D's schedule counts its own updates (d_steps per step)."""
    gan = _gan_with(smoke_params, steps=4, lr_decay=0.5, lr_g=1e-3, lr_d=2e-3)
    assert smoke_params.loss.d_steps == 1
    rates = [(float(gan.g_opt.learning_rate), float(gan.d_opt.learning_rate))]
    batches = _batches(smoke_params, mnist_dir)
    for _ in range(4):
        gan.train_block(batches, tf.constant(1))
        rates.append((float(gan.g_opt.learning_rate), float(gan.d_opt.learning_rate)))
    fractions = np.array([1, 1, 1, 0.5, 0])[:, None]
    np.testing.assert_allclose(rates, fractions * [1e-3, 2e-3], rtol=1e-6)
    frozen = [net.get_weights() for net in (gan.generator, gan.discriminator)]
    gan.train_block(batches, tf.constant(2))  # rate 0: Adam's step is rate * m / sqrt(v)
    for before, net in zip(frozen, (gan.generator, gan.discriminator), strict=True):
        for a, b in zip(before, net.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
