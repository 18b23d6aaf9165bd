"""The GAN and its training step. Where it runs (threads, seed, strategy, the input stream
of a possibly resumed run) is :mod:`pipeline.training.distribute`.

The shape follows the keras-io GAN examples: a ``GAN`` holds both nets and their optimizers,
and ``train_step`` returns a dict of named losses. What differs is speed: Keras' ``fit`` (or
a Python loop around a ``tf.function`` step) returns to Python after every batch, which on
small nets costs as much as the maths. Here ``train_block`` runs a whole epoch (or the steps
up to the next sample/checkpoint) inside one ``tf.function`` that pulls batches from a
``tf.data`` iterator, so Python wakes up once per block. Within a step, each batch is
computed as ``train.shards`` independent slices whose gradients are summed: TensorFlow runs
them side by side, one core each on CPU, where one op of a net this small cannot use two
cores. D judges real and fake images in one call, Adam updates each variable in one kernel
(``FusedAdam``), and each weight is read once for all the shards and calls that use it (so
under mixed precision it is cast to bfloat16 once, not per call): fewer, bigger ops, because
per-op overhead is what limits the step. And the work is ordered so that the cores idle
less, with the same values: G's step waits for D's gradients, and each step's weight
average runs at the start of the next.

Determinism: one ``seed`` sets the weight init, the noise stream (a ``tf.random.Generator``
whose state is checkpointed) and each epoch's shuffle order (a pure function of (seed,
epoch), see ``pipeline.training.dataset.make_dataset``). So a run resumed at step ``s`` with
the state checkpointed at ``s`` continues exactly as an uninterrupted one (on CPU, with op
determinism). This module is hashed into the checkpoint digest (``pipeline.training.checkpoints``):
change anything here and old checkpoints are no longer resumed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.core.params import Params
from pipeline.training.losses import (
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    mode_seeking,
    r1_penalty,
)
from pipeline.training.models import build_discriminator, build_generator, sample_noise
from pipeline.training.optimizers import adam

METRICS = ("d_loss", "g_loss", "d_real", "d_fake")  # what train_step returns, in this order
Weights = list[tuple[Any, tf.Tensor]]  # a net's variables, each with its value read for a step


class GAN:
    """Generator, discriminator, their Adam optimizers and the training noise stream."""

    def __init__(self, params: Params, strategy: tf.distribute.Strategy, steps: int) -> None:
        """``steps``: the run's length in training steps (where ``train.lr_decay`` ends)."""
        self.model, self.loss, self.strategy = params.model, params.loss, strategy
        self.global_batch, self.shards = params.train.batch_size, params.train.shards
        with strategy.scope():
            self.generator = build_generator(params.model)
            self.discriminator = build_discriminator(params.model)
            self.g_opt = adam(params.train, params.train.lr_g, steps)
            self.d_opt = adam(params.train, params.train.lr_d, steps * params.loss.d_steps)
            # Built now, so a checkpoint restores into existing slots (no deferred restore).
            self.g_opt.build(self.generator.trainable_variables)
            self.d_opt.build(self.discriminator.trainable_variables)
            self.rng = tf.random.Generator.from_seed(params.seed)
            # The average of G's weights (None when off: no extra variable, op or RNG draw).
            self.ema_decay = params.train.ema_decay
            self.generator_ema = _copy(self.generator, params) if self.ema_decay else None
        # Over several replicas the noise is drawn once per step for the global batch, outside
        # the replicas, and each takes its rows: inside, tf.random.Generator gives every
        # replica its own stream, so results would depend on the number of replicas.
        self.shared_noise = strategy.num_replicas_in_sync > 1
        step_fn = tf.function(self.train_step, jit_compile=params.train.jit_compile)
        self._step = step_fn if params.train.jit_compile else self.train_step

    def _with_label(self, x: tf.Tensor, labels: tf.Tensor) -> Any:
        return [x, labels] if self.model.conditional else x

    def _mean(self, per_example: tf.Tensor) -> tf.Tensor:
        # Divide by the global batch: summed over shards and replicas, this is the batch mean.
        return tf.reduce_sum(per_example) / tf.cast(self.global_batch, per_example.dtype)

    def draws(self, batch: tf.Tensor | int) -> list[tf.Tensor]:
        """Every random draw of one step, in the order the step uses them: per critic step
        its latents (and, for wgan_gp, the penalty's mixing weights), then G's latents."""
        shape, out = [batch, self.model.latent_dim], []
        for _ in range(self.loss.d_steps):
            out.append(sample_noise(self.model.noise, shape, self.rng))
            if self.loss.kind == "wgan_gp":
                out.append(self.rng.uniform([batch, 1, 1, 1]))
        out.append(sample_noise(self.model.noise, shape, self.rng))
        return out

    def train_step(
        self, real: tf.Tensor, labels: tf.Tensor, shared: list[tf.Tensor] | None = None
    ) -> dict[str, tf.Tensor]:
        """One D (x d_steps) and G update on ``real``. ``shared``: the global batch's draws
        (several replicas), of which this replica takes its rows, as of the batch."""
        g, d = self.generator, self.discriminator
        n = tf.shape(real)[0]
        if shared is None:
            noise = iter(self.draws(n))
        else:
            first = tf.distribute.get_replica_context().replica_id_in_sync_group * n
            noise = iter([x[first : first + n] for x in shared])
        g_weights = _read(g)  # G is not updated before its own step: one read serves both
        for _ in range(self.loss.d_steps):  # critic steps per generator step (unrolled)
            batch = [real, labels, next(noise)]
            if self.loss.kind == "wgan_gp":
                batch.append(next(noise))  # the penalty's mixing weights
            grads, (d_loss, d_real, d_fake) = self._gradients(
                self._d_losses, _read(d), g_weights, self.d_opt, batch
            )
            self.d_opt.apply(grads, d.trainable_variables)
        # G's step starts once D's gradients are in. TF's executor would otherwise start its
        # forward pass beside D's, at the step's start, delaying D's step; now it runs beside
        # D's Adam update, which holds one core while the other waits (the same values).
        with tf.control_dependencies(grads):
            z = tf.identity(next(noise))
        grads, (g_loss,) = self._gradients(
            self._g_losses, g_weights, _read(d), self.g_opt, [labels, z]
        )
        self.g_opt.apply(grads, g.trainable_variables)
        return {"d_loss": d_loss, "g_loss": g_loss, "d_real": d_real, "d_fake": d_fake}

    def _d_losses(
        self, real: tf.Tensor, labels: tf.Tensor, z: tf.Tensor, *eps: tf.Tensor
    ) -> tuple[tf.Tensor, ...]:
        """D's loss on a batch, and the mean of D's outputs on real and on fake images. One
        D call judges real and fake together: half the ops of two calls."""
        g, d, kind = self.generator, self.discriminator, self.loss.kind
        fake = g(self._with_label(z, labels), training=True)
        both = self._with_label(tf.concat([real, fake], 0), tf.concat([labels, labels], 0))
        real_logits, fake_logits = tf.split(d(both, training=True), 2)
        per_example = discriminator_loss(kind, real_logits, fake_logits, self.loss.label_smoothing)
        if kind == "wgan_gp":
            critic = lambda x: d(self._with_label(x, labels), training=True)  # noqa: E731
            per_example += self.loss.gp_weight * gradient_penalty(critic, real, fake, eps[0])
        loss = self._mean(per_example)
        if self.loss.r1:
            loss += self._r1(real, labels)
        return (
            loss,
            self._mean(tf.sigmoid(real_logits)),
            self._mean(tf.sigmoid(fake_logits)),
        )

    def _r1(self, real: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """The R1 term of D's loss, r1 / 2 * E|grad D(x)|^2 over the real images. Lazily,
        as in StyleGAN2: on every ``r1_every``-th D update only, weighted that many times, so
        it costs 1 / r1_every of its GEMMs and ops and adds the same on average. A function
        of D's update count, which checkpoints hold: a resumed run takes it on the same steps.
        D judges in inference mode here, as in G's step: the penalty is on D itself, not on
        one dropout mask, and it moves no state the nets keep (dropout seeds, batch
        statistics), which a branch taken only on some updates could not hand back."""
        every = self.loss.r1_every
        critic = lambda x: self.discriminator(self._with_label(x, labels))  # noqa: E731

        def term() -> tf.Tensor:  # a sum over the global batch divided by its size, as _mean
            penalty = r1_penalty(critic, real) * float(every)
            return 0.5 * self.loss.r1 * penalty / float(self.global_batch)

        if every == 1:
            return term()
        due = tf.equal(tf.math.floormod(tf.convert_to_tensor(self.d_opt.iterations), every), 0)
        return tf.cond(due, term, lambda: tf.zeros([]))

    def _g_losses(self, labels: tf.Tensor, z: tf.Tensor) -> tuple[tf.Tensor]:
        weight = self.loss.mode_seeking
        if weight:  # rows 2k and 2k + 1 get the same label: the mode-seeking term's pairs
            labels = tf.repeat(labels[::2], 2)[: tf.shape(labels)[0]]
        # D judges in inference mode here: its dropout regularises D's own updates, while
        # G learns from the whole discriminator.
        fake = self.generator(self._with_label(z, labels), training=True)
        logits = self.discriminator(self._with_label(fake, labels))
        loss = self._mean(generator_loss(self.loss.kind, logits))
        if weight:  # 2x per pair: summed over shards and replicas, the mean over all pairs
            loss += self._mean(2.0 * weight * mode_seeking(fake, z))
        return (loss,)

    def _gradients(
        self,
        losses: Callable[..., tuple[tf.Tensor, ...]],
        trained: Weights,
        fixed: Weights,
        optimizer: keras.optimizers.Optimizer,
        batch: list[tf.Tensor],
    ) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """Gradients of ``losses(*batch)[0]`` with respect to the ``trained`` weights, and
        the summed ``losses``, computed over ``train.shards`` row slices of ``batch`` by nets
        that read their weights from ``trained`` and ``fixed``. Each loss is a sum over the
        global batch divided by its size, so the slices' gradients add up to the batch's."""
        grads, totals, sources = [], [], [value for _, value in trained]
        for part in zip(*(tf.split(x, self.shards) for x in batch), strict=True):
            with self._computing_with(trained + fixed), tf.GradientTape() as tape:
                tape.watch(sources)
                values = losses(*part)
                scaled = optimizer.scale_loss(values[0])  # loss scaling under mixed precision
            grads.append(tape.gradient(scaled, sources))
            totals.append(values)
        return _sums(grads), _sums(totals)

    @contextlib.contextmanager
    def _computing_with(self, weights: Weights) -> Iterator[None]:
        """The nets compute with ``weights`` (values read before), not with fresh reads of
        their variables: the float32 -> bfloat16 casts of one read are then one op for
        grappler, where a read per call gave a cast per call and shard. Keras' scope holds
        back every assignment made in it; the state the nets update as they run (batch norm
        statistics, dropout seeds) is written after it."""
        with keras.StatelessScope(weights) as scope:
            yield
        read = {id(variable) for variable, _ in weights}
        for variable in self.generator.variables + self.discriminator.variables:
            value = scope.get_current_value(variable)
            if value is not None and id(variable) not in read:
                variable.assign(value)

    @tf.function
    def train_block(self, iterator: Any, steps: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Up to ``steps`` steps in one graph: (sum of each metric, steps done). Stops at
        the first non-finite metric, so ``done < steps`` says the run diverged."""
        sums, done = tf.zeros([len(METRICS)]), tf.constant(0)
        averaging = self.generator_ema is not None
        for i in tf.range(steps):
            args = next(iterator)
            if self.shared_noise:  # drawn here, in cross-replica context: one stream
                args = (*args, self.draws(self.global_batch))
            # The average of the step before: it reads the weights this step starts from, so
            # it runs beside this step's first ops instead of holding the next step back.
            if averaging and i > 0:
                self._update_ema()
            per_replica = self.strategy.run(self._step, args=args)
            metrics = tf.stack(
                [self.strategy.reduce("SUM", per_replica[key], axis=None) for key in METRICS]
            )
            if not tf.reduce_all(tf.math.is_finite(metrics)):
                break
            sums += metrics
            done += 1
        if averaging and steps > 0:  # the last step's: a block ends with the average up to date
            self._update_ema()
        return sums, done

    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights, after each step (cross-replica context,
        so every replica's copy gets the same value). All weights, so BatchNorm statistics
        are averaged too."""
        assert self.generator_ema is not None
        for average, weight in zip(self.generator_ema.weights, self.generator.weights, strict=True):
            average.assign(self.ema_decay * average + (1.0 - self.ema_decay) * weight)

    @property
    def shipped(self) -> keras.Model:
        """The generator train writes and samples: the EMA one when it is on."""
        return self.generator if self.generator_ema is None else self.generator_ema

    def sample(self, z: np.ndarray, labels: np.ndarray, raw: bool = False) -> np.ndarray:
        """Images from the shipped generator, or from the raw one when ``raw``."""
        net = self.generator if raw else self.shipped
        return net(self._with_label(z, labels), training=False).numpy()


def _read(net: keras.Model) -> Weights:
    return [(variable, tf.convert_to_tensor(variable)) for variable in net.trainable_variables]


def _copy(generator: keras.Model, params: Params) -> keras.Model:
    """A second generator starting from the same weights (its own init is overwritten)."""
    copy = build_generator(params.model)
    for target, source in zip(copy.weights, generator.weights, strict=True):
        target.assign(source)
    return copy


def _sums(parts: list[Any]) -> list[tf.Tensor]:
    """Element-wise sums of equal-length lists of tensors, in a fixed order."""
    columns = zip(*parts, strict=True)
    return [tf.add_n(list(column)) if len(column) > 1 else column[0] for column in columns]
