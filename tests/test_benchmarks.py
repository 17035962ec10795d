"""The benchmark suite still runs (a tiny configuration; no timing asserted)."""

from benchmarks import train_throughput


def test_throughput_suite_runs_and_reports(tmp_path, real_data):
  real_data("mnist/t10k-images-idx3-ubyte.gz")
  results = tmp_path / "RESULTS.md"
  report = train_throughput.main([
      "--variants=avb,avb_streamed", "--rounds=1", "--num-images=1000",
      "--devices=1", "--matmul-size=128", "--matmul-repeats=1",
      f"--results={results}"])
  assert set(report["examples_per_sec"]) == {"avb", "avb_streamed"}
  assert report["examples_per_sec"]["avb"]["median"] > 0
  assert "avb / avb_streamed (examples/s)" in report["ratios"]
  assert 0 <= report["input_wait_fraction"]["avb_streamed"]["median"] <= 1
  # The two paths train on the same batches with the same noise.
  elbo = report["final_epoch_train_elbo"]
  assert abs(elbo["avb"] - elbo["avb_streamed"]) < 1e-3 * abs(elbo["avb"])
  assert report["flops_per_example"]["total"] == 4_100_000
  assert "| avb |" in results.read_text()


def test_flop_count_is_about_two_and_a_half_forwards():
  from avb import models  # pylint: disable=g-import-not-at-top
  config = models.ModelConfig(data_shape=(28, 28), num_latents=20,
                              hidden_sizes=(500,))
  flops = train_throughput.matmul_flops_per_example(config, num_samples=1)
  assert flops["forward"] == 2 * (784 * 500 + 2 * 500 * 20 + 20 * 500 + 500 * 784)
  assert 2.4 < flops["total"] / flops["forward"] < 2.6


def test_figure2_time_projects_every_group(capsys, real_data):
  real_data("frey_face/frey_rawface.mat")
  from benchmarks import figure2_time  # pylint: disable=g-import-not-at-top
  report = figure2_time.main(["--variant=smoke", "--examples=400",
                              "--num-seeds=1", "--rounds=1"])
  # The smoke variant has one latent size: one AEVB and one wake-sleep group.
  assert set(report["groups"]) == {"aevb_z2", "wake_sleep_z2"}
  total = sum(g["projected_seconds"] for g in report["groups"].values())
  assert abs(total - report["projected_seconds"]) < 1e-6
  assert report["projected_seconds"] > 0
  assert "projected / target" in capsys.readouterr().out
