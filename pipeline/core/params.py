"""The one typed schema for ``params.yaml``.

Every stage calls :func:`load_params` before doing any work, so a typo or an out-of-range
value fails in milliseconds with the dotted field path, the value given and what is
allowed, instead of an hour into training. Defaults live in ``params.yaml``, not here:
every field is required, so the file is the single source of truth.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ConfigTypeError
from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.core.errors import UserError

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, lt=1)]
Beta = Annotated[float, Field(ge=0, lt=1)]


class Section(BaseModel):
    # forbid: an unknown key is almost always a typo that would otherwise be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    mirrors: list[AnyHttpUrl] = Field(min_length=1)
    timeout_s: PositiveFloat
    retries: Annotated[int, Field(ge=0, le=10)]
    limit: PositiveInt | None  # use only the first N training images (fast runs)


class ModelParams(Section):
    arch: Literal["mlp", "dcgan"]
    conditional: bool
    latent_dim: PositiveInt
    noise: Literal["normal", "uniform"]
    output: Literal["tanh", "sigmoid"]  # tanh: data in [-1, 1]; sigmoid: data in [0, 1]
    g_hidden: list[PositiveInt]  # mlp only
    d_hidden: list[PositiveInt]  # mlp only
    d_dropout: Probability  # mlp only: dropout after each hidden layer of D
    d_minibatch_std: Annotated[int, Field(ge=0)]  # mlp only: group size (0 = off)
    d_projection: bool  # conditional only: the label also scores D's last features
    activation: Literal["relu", "leaky_relu"]
    leaky_alpha: Annotated[float, Field(gt=0, lt=1)]
    init: Literal["glorot", "truncated_normal"]
    init_stddev: PositiveFloat  # truncated_normal only

    @model_validator(mode="after")
    def _mlp_needs_layers(self) -> ModelParams:
        if self.arch == "mlp" and (not self.g_hidden or not self.d_hidden):
            raise ValueError("arch 'mlp' needs non-empty g_hidden and d_hidden")
        return self

    @field_validator("d_projection")
    @classmethod
    def _projection_needs_labels(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("conditional") is False:
            raise ValueError("allowed only with model.conditional: true (it scores the label)")
        return value


class LossParams(Section):
    kind: Literal["minimax", "non_saturating", "wgan_gp", "hinge"]
    label_smoothing: Probability  # one-sided: the real target becomes 1 - s
    gp_weight: Annotated[float, Field(ge=0)]  # wgan_gp only
    d_steps: Annotated[int, Field(ge=1, le=10)]  # discriminator steps per generator step
    # Weight of the mode-seeking term (Mao et al., 2019) in G's loss; 0 = off (no extra ops)
    mode_seeking: Annotated[float, Field(ge=0)]
    # Weight of the R1 penalty on D's gradient at real images (Mescheder et al., 2018); 0 = off
    r1: Annotated[float, Field(ge=0)]
    r1_every: Annotated[int, Field(ge=1, le=64)]  # taken on every N-th D update, weighted xN


class TrainParams(Section):
    batch_size: PositiveInt
    # Exactly one of epochs/steps sets the length; sample_every and checkpoint_every are
    # counted in that same unit.
    epochs: PositiveInt | None
    steps: PositiveInt | None
    lr_g: PositiveFloat
    lr_d: PositiveFloat
    beta1: Beta
    beta2: Beta
    # The last fraction of the run over which both learning rates fall linearly to 0
    # (pix2pix/CycleGAN's schedule); 0 = constant.
    lr_decay: Annotated[float, Field(ge=0, lt=1)]
    # Exponential moving average of the generator's weights, updated after every step; the
    # average is what train writes as the generator. 0 = off (no extra ops: bit-identical).
    ema_decay: Beta
    strategy: Literal["auto", "default", "mirrored", "multi_worker"]
    # Each (replica's) batch is computed as this many independent parts whose gradients are
    # summed: the same maths on any machine; on CPU each part gets its own core.
    shards: Annotated[int, Field(ge=1, le=64)]
    jit_compile: bool
    # float16 on a GPU, bfloat16 on a CPU that has it natively (AMX, AVX512-BF16); else off
    mixed_precision: bool
    checkpoint_every: PositiveInt
    sample_every: PositiveInt
    sample_grid: Annotated[int, Field(ge=2, le=16)]  # fixed-noise grid is N x N

    @model_validator(mode="after")
    def _one_length(self) -> TrainParams:
        if (self.epochs is None) == (self.steps is None):
            raise ValueError(
                f"set exactly one of epochs or steps (got epochs={self.epochs}, steps={self.steps})"
            )
        return self

    @model_validator(mode="after")
    def _shards_divide_the_batch(self) -> TrainParams:
        if self.batch_size % self.shards:
            raise ValueError(
                f"shards: got {self.shards}; must divide batch_size ({self.batch_size})"
            )
        return self


class MlflowParams(Section):
    experiment: str = Field(min_length=1)


class EvalParams(Section):
    num_samples: Annotated[int, Field(ge=100, le=100_000)]
    seed: Annotated[int, Field(ge=0)]
    batch_size: PositiveInt
    knn_k: Annotated[int, Field(ge=1, le=50)]  # k of the k-NN manifolds (precision/recall)


class ExportParams(Section):
    opset: Annotated[int, Field(ge=13, le=21)]
    parity_tol: PositiveFloat
    registered_model: str | None  # register in the MLflow model registry under this name


class GenerateParams(Section):
    n: Annotated[int, Field(ge=1, le=1024)]
    seed: Annotated[int, Field(ge=0)]
    digit: Annotated[int, Field(ge=0, le=9)] | None


class Params(Section):
    preset: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: Annotated[int, Field(ge=0)]
    data: DataParams
    model: ModelParams
    loss: LossParams
    train: TrainParams
    mlflow: MlflowParams
    eval: EvalParams
    export: ExportParams
    generate: GenerateParams

    def flat(self) -> dict[str, Any]:
        """``{"train.lr_g": 0.0002, ...}``: the form MLflow params and DVC ``-S`` use."""
        return flatten(self.model_dump(mode="json"))

    def digest(self, *sections: str) -> str:
        """A short stable hash of the given sections (all when none): says whether a
        checkpoint or an exported model came from these exact settings."""
        dump = self.model_dump(mode="json")
        chosen = {key: dump[key] for key in sections} if sections else dump
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


class ParamsError(UserError, ValueError):
    """params.yaml is invalid; the message lists every offending field."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _describe(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "<root>"
    if error["type"] == "extra_forbidden":
        return f"{field}: unknown key (value {error['input']!r}); check the spelling"
    if error["type"] == "missing":
        return f"{field}: missing (every key is required; see params.yaml in the repo)"
    allowed = error["msg"].removeprefix("Value error, ")
    return f"{field}: got {error['input']!r}; {allowed}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {raw!r}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(dict(error)) for error in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(
    path: str | Path = "params.yaml",
    overrides: dict[str, Any] | None = None,
    source: str | None = None,
) -> Params:
    """``path`` validated, with dotted ``overrides`` (a preset's, say) set first; errors are
    reported against ``source`` (default: the path)."""
    path = Path(path)
    with path.open() as handle:
        raw = yaml.safe_load(handle)
    if overrides:
        raw = apply_overrides(raw, overrides)
    return parse_params(raw, source or str(path))


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the nested ``raw`` params with dotted ``overrides`` set (OmegaConf in struct
    mode: a key that params.yaml lacks is an error, not a silent addition)."""
    config = OmegaConf.create(raw)
    OmegaConf.set_struct(config, True)
    for dotted, value in overrides.items():
        try:
            OmegaConf.update(config, dotted, value, merge=False)
        except (ConfigAttributeError, ConfigKeyError, ConfigTypeError):
            section = dotted.rpartition(".")[0]
            if section and not isinstance(OmegaConf.select(config, section), DictConfig):
                raise ParamsError(f"{dotted}: no such section {section!r} in params.yaml") from None
            raise ParamsError(f"{dotted}: unknown key; check the spelling") from None
    result = OmegaConf.to_container(config)
    assert isinstance(result, dict)
    return {str(key): value for key, value in result.items()}
