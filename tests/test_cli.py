"""The command line: help, the Gaussian-mixture sampler picture, the sampler benchmark, errors."""

import subprocess
import sys

import pytest

from difflab.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sample" in out and "bench" in out


def test_python_dash_m_difflab_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "difflab", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: difflab") and "align" in proc.stdout


def test_bench_samplers_quick_table(tmp_path, capsys):
    main(["bench", "samplers", "--quick", "--out", str(tmp_path / "samplers.md")])
    out = capsys.readouterr().out
    for name in ("DDIM", "DPM-Solver++ 2M", "UniPC", "difflab euler-ddim"):
        assert f"| {name} |" in out
    assert "NFE 5" in out and "NFE 10" in out
    doc = (tmp_path / "samplers.md").read_text()
    assert "Command:" in doc and (tmp_path / "samplers.png").exists()


def test_unknown_scheduler_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", "--model", "gmm", "--scheduler", "nope", "--out", "x.png"])
    assert exit_info.value.code == 2
    assert "use one of" in capsys.readouterr().err


def test_import_without_torchvision():
    """difflab and every subpackage but difflab.eval import with torchvision unavailable."""
    code = (
        "import sys; sys.modules['torchvision'] = None\n"
        "import difflab, difflab.schedule, difflab.samplers, difflab.models, difflab.models.gmm, difflab.cli\n"
        "import difflab.benchmarks.samplers\n"
        "assert 'torchvision' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bench_stability_and_lml_smoke(tmp_path, capsys):
    main(["bench", "stability", "--digits-per-class", "0", "--scales", "10", "--steps", "8", "--mixture-dims", "2",
          "--num-samples", "64", "--out", str(tmp_path / "new" / "stability.md")])  # the folder is created
    main(["bench", "lml", "--digits-models", "--mixture-dims", "4", "--num-samples", "32", "--out", str(tmp_path / "lml.md")])
    out = capsys.readouterr().out
    assert "| 10 | 8 |" in out and "PLMS-4 + HB 0.8" in out and "Reference, reference (DPM-Solver++ 2M" in out
    assert "scale-free lambda 3, kappa 0.2" in out and "not measured" in out
    assert "Command:" in (tmp_path / "new" / "stability.md").read_text()
    assert (tmp_path / "new" / "stability.png").is_file()


def test_bench_stability_runs_on_the_grid_it_is_given(tmp_path, capsys):
    common = ["bench", "stability", "--digits-per-class", "0", "--scales", "10", "--steps", "5", "--mixture-dims", "2",
              "--num-samples", "64"]
    main([*common, "--out", str(tmp_path / "config.md")])
    main([*common, "--grid", "ddim-uniform", "--out", str(tmp_path / "ddim.md")])
    config, ddim = ((tmp_path / f).read_text() for f in ("config.md", "ddim.md"))
    assert "This page's grid: config" in config and "This page's grid: ddim-uniform" in ddim

    def table(page: str) -> str:
        return page[page.index("| CFG |"):page.index("Reference,")]

    assert table(config) != table(ddim)  # the solvers really ran on another grid


def test_get_scheduler_by_name_for_vp_and_flow_configs():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from difflab.samplers import get_scheduler

    flow = FlowMatchEulerDiscreteScheduler(shift=3.0).config
    assert type(get_scheduler("euler", flow)).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert get_scheduler("euler", flow).config.shift == 3.0
    assert get_scheduler("dpm++2m", flow).config.prediction_type == "flow_prediction"
    assert get_scheduler("ghvb", flow).config.prediction_type == "flow_prediction"
    assert type(get_scheduler("euler", DDPMScheduler().config)).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ValueError, match="no flow-matching mode"):
        get_scheduler("ddim", flow)


def test_models_train_digits_through_the_cli(tmp_path):
    main(["models", "train-digits", "--model", "digits-classifier", "--output_dir", str(tmp_path / "clf"),
          "--max_train_steps", "2", "--train_batch_size", "8"])
    assert (tmp_path / "clf" / "diffusion_pytorch_model.safetensors").exists()


def test_ddim_uniform_grid_is_the_grid_of_sd_ddim():
    from diffusers import DDIMScheduler

    from difflab.benchmarks.stability import grid_kwargs

    ddim = DDIMScheduler(timestep_spacing="leading", steps_offset=1)
    for steps in (5, 8, 10, 100):
        ddim.set_timesteps(steps)
        assert grid_kwargs("ddim-uniform", steps)["timesteps"] == ddim.timesteps.tolist()
    assert grid_kwargs("config", 8) == {"num_inference_steps": 8}


def test_sample_other_diffusers_pipelines(tmp_path, capsys):
    """`difflab sample` draws text pipelines one row per prompt, unconditional ones in one row; wrong flags are
    messages."""
    from PIL import Image

    from difflab.models.tiny import tiny_ddpm_pipeline, tiny_sd_pipeline

    tiny_sd_pipeline().save_pretrained(tmp_path / "sd")
    tiny_ddpm_pipeline().save_pretrained(tmp_path / "ddpm")
    main(["sample", "--model", str(tmp_path / "sd"), "--prompt", "a cat", "a dog", "--num-per-class", "3",
          "--steps", "2", "--scheduler", "dpm++2m", "--out", str(tmp_path / "sd.png")])
    main(["sample", "--model", str(tmp_path / "ddpm"), "--num-per-class", "4", "--steps", "2",
          "--out", str(tmp_path / "ddpm.png")])
    assert Image.open(tmp_path / "sd.png").size == (3 * 64, 2 * 64)
    assert Image.open(tmp_path / "ddpm.png").size == (4 * 8, 8)
    for flags, message in [(["--model", str(tmp_path / "sd")], "pass --prompt"),
                           (["--model", str(tmp_path / "ddpm"), "--guidance-scale", "3"], "is unconditional"),
                           (["--prompt", "a cat"], "the digits models take --classes")]:
        with pytest.raises(SystemExit) as exit_info:
            main(["sample", *flags, "--out", str(tmp_path / "x.png")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["guidance", "fit-linear-ag", "--model", str(tmp_path / "sd"), "--out", str(tmp_path / "c.json")])
    assert "fit_linear_ag(pipe, call_kwargs" in capsys.readouterr().err
