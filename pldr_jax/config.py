"""The configuration dataclasses of pldr-jax.

`PLDRConfig` (the model), `TrainConfig` (optimisation and schedule, used by
`pldr_jax.training`), `DataConfig` (the input pipeline, `pldr_jax.data`) and
`SamplingConfig` / `SamplingPath` (generation, `pldr_jax.inference.generate`).
They are frozen (hashable) dataclasses, so a `PLDRConfig` can be passed to
`jax.jit` as a static argument. Gin binds them only at the entry points; each
name has this one home. This module imports nothing of pldr_jax but `errors`.
(LESS kernel training has its own, `less_jax.config.LessTrainConfig`.)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from pldr_jax.errors import ConfigError, DataError

GMode = Literal["learned", "identity", "random", "transferred"]
G_MODES = ("learned", "identity", "random", "transferred")
_DTYPES = ("float32", "bfloat16", "float16", "float64")
# How a whole-sequence pass computes attention (PLDRConfig.attention).
ATTENTION_IMPLS = ("plain", "xla", "cudnn", "flash")
# What the backward pass keeps of a layer's forward (PLDRConfig.remat).
REMAT_POLICIES = ("none", "minimal", "full")
# Which of the authors' initialisations init_params draws (PLDRConfig.init_recipe).
INIT_RECIPES = ("kvg", "soc")


# What a field annotated with these accepts (bool is never an int or a float here).
_FIELD_TYPES = {"int": (int, np.integer), "float": (int, float, np.integer, np.floating),
                "bool": (bool, np.bool_), "str": (str,)}
_FIELD_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False",
                "str": "a string", "None": "None"}


def check_field_types(config) -> None:
  """ConfigError naming the first field whose value does not fit its annotation
  (int, float, bool, str, optionally `| None`), e.g. TrainConfig.num_steps='ten'."""
  for f in dataclasses.fields(config):
    kinds = [k.strip() for k in str(f.type).split("|")]
    if not kinds or any(k not in _FIELD_TYPES and k != "None" for k in kinds):
      continue  # Literal, a class, ...: checked by the config itself
    value = getattr(config, f.name)
    if value is None and "None" in kinds:
      continue
    ok = any(isinstance(value, _FIELD_TYPES[k]) for k in kinds if k != "None")
    if ok and "bool" not in kinds and isinstance(value, (bool, np.bool_)):
      ok = False
    if not ok:
      want = " or ".join(_FIELD_WORDS[k] for k in kinds)
      raise ConfigError(f"{type(config).__name__}.{f.name}={value!r} is not valid: it must be "
                        f"{want} (default {f.default!r})")

def check_int(name: str, value, minimum: int = 0, *, error: type[Exception] = ConfigError,
              optional: bool = False, hint: str = "") -> int | None:
  """`value` as a Python int when it is an integer (never a bool) >= `minimum`, else
  `error`: '<name> must be an int, got ...' / '<name> must be >= <minimum>, got ...<hint>'.
  optional: None passes through. The one int check of pldr_jax's and less_jax's configs
  and public functions."""
  if optional and value is None:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise error(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise error(f"{name} must be >= {minimum}, got {value}{hint}")
  return int(value)


# The TFDS name of the local text-corpus builder (pldr_jax.data.tfds_text).
LOCAL_DATASET = "pldr_text_corpus"

@dataclasses.dataclass(frozen=True)
class PLDRConfig:
  """Every hyperparameter of a PLDR-LLM decoder (see docs/pldr.md).

  Attributes:
    vocab_size: V, size of the embedding and LM head.
    d_model: d = num_heads * head_dim.
    num_heads: H.
    num_layers: number of decoder layers.
    d_ff: hidden width of the SwiGLU feed-forward network.
    a_dff: hidden width of the metric learner's GLUs (dk -> a_dff -> dk).
    num_res_units: residual units of the metric learner (2 GLUs each).
    max_len: context length (longest sequence the model accepts).
    param_dtype: dtype parameters are stored in.
    compute_dtype: dtype of matmuls; the power-law step, softmax and loss run
      in at least float32 whatever this is.
    g_mode: "learned" (full PLGA), "identity" (= SDPA), "random" or
      "transferred" (a constant G_LM given from outside; no metric learner or
      power-law parameters exist in these modes).
    causal_metric: build A at position t from queries <= t only (the reference
      sums over the whole sequence).
    ln_eps: LayerNorm epsilon.
    rope_base: rotary embedding base.
    rope_interleaved: rotary pairs (x[2i], x[2i+1]) as the authors' code (True,
      the Hugging Face port's `reference_rope=true`) or (x[i], x[i + dk/2]),
      rotate_half (False, `reference_rope=false`). Same weights, other outputs.
    scan_layers: run the stacked layers of a whole-sequence pass (training,
      scoring, prefill) with one `lax.scan` (True: one layer compiled) or
      unrolled (False). Same numbers; decode always runs unrolled on
      per-layer weights (pldr_jax.inference.decode.decode_params).
    attention: how a whole-sequence pass (training, scoring, prefill) computes
      softmax((q G_LM) k^T / sqrt(dk)) v. "plain": the formula as written, the
      [B, H, S, S] scores materialised in fp32 (pldr_jax.plga.plga_attention).
      "xla" / "cudnn": `jax.nn.dot_product_attention` on the query q G_LM with
      that implementation; "cudnn" is cuDNN's fused (flash) kernel, GPU only,
      bfloat16/float16 compute, and never stores the scores. "flash": the
      Pallas TPU flash-attention kernel (TPU only; pldr_jax.plga.flash_attention),
      which never stores the scores either. Same maths; calls
      that return the deductive outputs (the scores among them) and decode
      always take "plain".
    remat: what the backward pass keeps of each layer's forward
      (`jax.checkpoint` around the layer). "none": everything autodiff saves;
      "minimal": the outputs of the weight matmuls (dots without batch
      dimensions), the attention and elementwise work recomputed; "full":
      only the layer's input, the whole layer recomputed. Same numbers, less
      memory for more compute (MaxText's `remat_policy`).
    init_recipe: which of the authors' initialisations `init_params` draws.
      "kvg" (default): their PLDR-LLM-with-KV-G-cache code (the published
      PLDRv51 models), whose init call targets wk twice and never wv, so wv
      keeps torch's default Linear init, U(+-1/sqrt(d)) for weight and bias.
      "soc": their self-organized-criticality repository (pldr_model_v510.py),
      which gives wv the Xavier-uniform weight and zero bias of every other
      Linear layer. Only wv differs.
    loss_chunk: positions per chunk of the LM head and the cross-entropy in
      training and evaluation (pldr_jax.training.train.chunked_cross_entropy): the
      [B, S, V] logits are never stored whole, each chunk's are recomputed in
      the backward pass. 0: the whole sequence at once. Same numbers, less
      memory and HBM traffic for one more LM-head matmul (MaxText's vocab
      tiling, over the sequence).
  """

  vocab_size: int = 32000
  d_model: int = 896
  num_heads: int = 14
  num_layers: int = 5
  d_ff: int = 2389
  a_dff: int = 170
  num_res_units: int = 8
  max_len: int = 1024
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  g_mode: GMode = "learned"
  causal_metric: bool = False
  ln_eps: float = 1e-6
  rope_base: float = 10000.0
  rope_interleaved: bool = True
  scan_layers: bool = True
  attention: str = "plain"
  remat: str = "none"
  loss_chunk: int = 0
  init_recipe: str = "kvg"

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff",
                 "a_dff", "max_len"):
      check_int(f"PLDRConfig.{name}", getattr(self, name), 1)
    check_int("PLDRConfig.num_res_units", self.num_res_units, 0)
    if self.d_model % self.num_heads:
      raise ConfigError(
          f"PLDRConfig.d_model={self.d_model} is not divisible by "
          f"num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ConfigError(
          f"head_dim = d_model/num_heads = {self.head_dim} must be even for the "
          "rotary embedding")
    if not isinstance(self.scan_layers, (bool, np.bool_)):
      raise ConfigError(f"PLDRConfig.scan_layers must be True or False, got {self.scan_layers!r}")
    if not isinstance(self.rope_interleaved, (bool, np.bool_)):
      raise ConfigError(
          f"PLDRConfig.rope_interleaved must be True or False, got {self.rope_interleaved!r}")
    if self.g_mode not in G_MODES:
      raise ConfigError(f"PLDRConfig.g_mode={self.g_mode!r} is not one of {G_MODES}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(
            f"PLDRConfig.{name}={getattr(self, name)!r} is not one of {_DTYPES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ConfigError(
          f"PLDRConfig.attention={self.attention!r} is not one of {ATTENTION_IMPLS}")
    if self.attention == "cudnn" and self.compute_dtype not in ("bfloat16", "float16"):
      raise ConfigError(
          f"PLDRConfig.attention='cudnn' needs compute_dtype bfloat16 or float16 (cuDNN's "
          f"fused attention), got {self.compute_dtype!r}")
    if self.init_recipe not in INIT_RECIPES:
      raise ConfigError(
          f"PLDRConfig.init_recipe={self.init_recipe!r} is not one of {INIT_RECIPES} ('kvg': "
          "the KV-G-cache code's init, wv at torch's default; 'soc': wv Xavier uniform)")
    if self.remat not in REMAT_POLICIES:
      raise ConfigError(f"PLDRConfig.remat={self.remat!r} is not one of {REMAT_POLICIES}")
    check_int("PLDRConfig.loss_chunk", self.loss_chunk, 0, hint=" (0: no chunks)")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def learned_g(self) -> bool:
    """True when G_LM is computed by the metric learner and power-law step."""
    return self.g_mode == "learned"

  def replace(self, **kwargs) -> "PLDRConfig":
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(f"unknown PLDRConfig field(s): {sorted(unknown)}")
    return dataclasses.replace(self, **kwargs)


def pldrv51_110m(**overrides) -> PLDRConfig:
  """The published PLDRv51-110M configuration (109,689,362 parameters)."""
  return PLDRConfig().replace(**overrides)


def tiny(**overrides) -> PLDRConfig:
  """A few-thousand-parameter config for tests (2 layers, 2 heads, dk 8)."""
  base = PLDRConfig(vocab_size=64, d_model=16, num_heads=2, num_layers=2,
                    d_ff=24, a_dff=12, num_res_units=2, max_len=32)
  return base.replace(**overrides)


PRESETS = {"pldrv51_110m": pldrv51_110m, "tiny": tiny}


def preset(name: str, **overrides) -> PLDRConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and schedule (defaults: the published PLDRv51 recipe).

  Attributes:
    num_steps: optimizer steps to run.
    learning_rate: peak learning rate after warmup.
    warmup_steps: linear warmup from 0.
    end_lr_ratio: cosine decays to learning_rate * end_lr_ratio at num_steps.
    beta1, beta2, eps, weight_decay: AdamW.
    decay_all_params: AdamW decays every parameter (biases, LayerNorms and the
      embedding included), as the authors' torch.optim.AdamW does; False
      decays matrices only (ndim >= 2), the common LLM practice.
    clip_value: clip each gradient element to [-clip_value, clip_value] (0: off).
    dag_coeff: weight c of the DAG loss term (0: off).
    seed: parameter-init seed.
    mesh_data, mesh_fsdp: mesh shape; -1 means "all remaining devices".
    log_every, eval_every, checkpoint_every: in steps.
    keep_checkpoints: how many checkpoints Orbax keeps.
  (How many validation batches an evaluation reads is DataConfig.max_eval_batches.)
  """
  # The schedule: linear warm-up, then cosine decay to learning_rate * end_lr_ratio.
  num_steps: int = 250_000
  learning_rate: float = 1e-3
  warmup_steps: int = 2000
  end_lr_ratio: float = 0.1
  # AdamW, gradient clipping and the optional DAG regulariser.
  beta1: float = 0.9
  beta2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  decay_all_params: bool = True
  clip_value: float = 1.0
  dag_coeff: float = 0.0
  # Initialisation, the device mesh, logging, evaluation and checkpoints.
  seed: int = 1234
  mesh_data: int = -1
  mesh_fsdp: int = 1
  log_every: int = 10
  eval_every: int = 1000
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3

  def __post_init__(self):
    check_field_types(self)
    if self.num_steps < 1:
      raise ConfigError(f"TrainConfig.num_steps must be >= 1, got {self.num_steps}")
    if self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ConfigError("TrainConfig needs learning_rate > 0 and warmup_steps >= 0")
    for name in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ConfigError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes batches.

  Attributes:
    dataset: TFDS name given to `tfds.data_source`: "pldr_text_corpus" (the
      local builder), or any registered text dataset, e.g. "c4/en:3.1.0",
      "lm1b" — prepared in ArrayRecord format under `data_dir`.
    data_dir: TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets).
    train_split / eval_split: TFDS split names (slicing like "train[:1%]" works).
    text_key: feature holding the document text ("text" for c4, lm1b and the
      local builder).
    tokenizer_path: SentencePiece .model with [PAD]=0 [UNK]=1 [START]=2 [END]=3.
    vocab_size: pieces to train when `prepare_default_data` makes a tokenizer
      (an upper bound: see `train_tokenizer`).
    seq_len: tokens per chunk (>= 2: inputs are tokens[:-1], targets tokens[1:]).
    batch_size: chunks per training batch (per host when sharded).
    eval_batch_size: chunks per eval batch (None: batch_size).
    max_eval_batches: stop evaluation after this many batches (None: whole split); the
      training loop's periodic evaluation reads this many too.
    seed: shuffle seed.
    shuffle: shuffle documents (train only).
    num_epochs: passes over the train split (None: repeat forever).
    num_threads: grain reader threads that tokenize ahead (0: in the caller).
    prefetch_buffer_size: documents tokenized ahead.
    download: let TFDS download/prepare a registered dataset when missing.
  """

  dataset: str = LOCAL_DATASET
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  text_key: str = "text"
  tokenizer_path: str | None = None
  vocab_size: int = 32000
  seq_len: int = 1024
  batch_size: int = 32
  eval_batch_size: int | None = None
  max_eval_batches: int | None = None
  seed: int = 1234
  shuffle: bool = True
  num_epochs: int | None = None
  num_threads: int = 4
  prefetch_buffer_size: int = 64
  download: bool = False

  def __post_init__(self):
    def _int(name, minimum, optional=False):
      check_int(f"DataConfig.{name}", getattr(self, name), minimum, error=DataError,
                optional=optional)
    _int("seq_len", 2)
    _int("batch_size", 1)
    _int("eval_batch_size", 1, optional=True)
    _int("max_eval_batches", 1, optional=True)
    _int("num_epochs", 1, optional=True)
    _int("vocab_size", 1)
    _int("num_threads", 0)
    _int("prefetch_buffer_size", 0)
    _int("seed", 0)
    for name in ("dataset", "train_split", "eval_split", "text_key"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise DataError(f"DataConfig.{name} must be a non-empty string")

  def replace(self, **kwargs) -> "DataConfig":
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise DataError(f"unknown DataConfig field(s): {sorted(unknown)}")
    return dataclasses.replace(self, **kwargs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; stop_token -1 = none."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token: int = -1

  def __post_init__(self):
    if self.temperature < 0:
      raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def path(self) -> "SamplingPath":
    """The static part: which sampling program runs."""
    return SamplingPath(greedy=self.temperature == 0.0, top_k=int(self.top_k),
                        top_p=self.top_p < 1.0)

  def as_arrays(self) -> dict:
    """The traced part."""
    import jax.numpy as jnp
    return {"temperature": jnp.float32(self.temperature), "top_p": jnp.float32(self.top_p),
            "stop_token": jnp.int32(self.stop_token)}


@dataclasses.dataclass(frozen=True)
class SamplingPath:
  """Static choice of sampling program: greedy (argmax), else temperature sampling,
  restricted to the top_k largest logits (0: all) and, if top_p, to the smallest
  set of most likely of those whose probability reaches the traced top_p."""
  greedy: bool = True
  top_k: int = 0
  top_p: bool = False
