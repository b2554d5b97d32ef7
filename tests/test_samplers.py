"""Noise schedule and samplers against the matching diffusers schedulers (SD's scheduler settings)."""

import math

import pytest
import torch
from conftest import assert_close

import sd_model as sdm

SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                   steps_offset=1, timestep_spacing="leading")


def toy_model(x, t):
    """A smooth, timestep-dependent stand-in for a denoiser."""
    t = float(t)
    return 0.3 * x * math.sin(t / 170.0) + 0.2 * torch.tanh(x) + 0.05 * t / 1000


def test_schedule_constants_and_forward_process():
    from diffusers import DDPMScheduler

    s = sdm.NoiseSchedule()
    ref = DDPMScheduler(**SD_SCHEDULE)
    assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6, what="alphas_cumprod")
    assert abs(s.alphas_cumprod[0].item() - 0.99915) < 1e-9 and abs(s.alphas_cumprod[-1].item() - 0.0046600) < 1e-6
    assert s.timesteps(50)[:2] == [981, 961] and s.timesteps(50)[-1] == 1
    for bad in (0, 1000, 1001):  # zero divided by zero; 1000 + offset reached t = 1000 (an IndexError); over T repeated t = 1
        with pytest.raises(ValueError, match="steps must be between 1 and 999"):
            s.timesteps(bad)
    assert s.timesteps(999) == list(range(999, 0, -1))
    assert sdm.NoiseSchedule(sdm.ScheduleConfig(timestep_spacing="trailing")).timesteps(1000) == list(range(999, -1, -1))
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    assert_close(s.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), what="q_sample (DDPM Eq. 4)")
    v = sdm.NoiseSchedule(sdm.ScheduleConfig(prediction="v"))
    assert_close(v.target(x0, noise, t), ref.get_velocity(x0, noise, t), what="v target")
    assert torch.equal(s.target(x0, noise, t), noise)
    # moments of q(x_t | x0): mean sqrt(a) x0, std sqrt(1 - a)
    xt = s.q_sample(torch.full((200_000,), 2.0), torch.tensor(300), torch.randn(200_000))
    a = s.alphas_cumprod[300].item()
    assert abs(xt.mean().item() - 2 * a**0.5) < 0.01 and abs(xt.std().item() - (1 - a) ** 0.5) < 0.01
    # eps_x0 inverts q_sample for both parametrisations
    for sched in (s, v):
        xt = sched.q_sample(x0, t, noise)
        eps, x0_hat = sched.eps_x0(sched.target(x0, noise, t), xt, t)
        assert_close(eps, noise, atol=1e-4, what="eps") and assert_close(x0_hat, x0, atol=1e-3, what="x0")


def diffusers_loop(sched, x, steps, generator=None, timesteps=None, **step_kw):
    sched.set_timesteps(steps) if timesteps is None else sched.set_timesteps(timesteps=timesteps)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        out = toy_model(sched.scale_model_input(x, t), t)
        x = sched.step(out, t, x, generator=generator, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("sampler,prediction,eta", [("ddim", "eps", 0.0), ("ddim", "eps", 1.0), ("ddim", "v", 0.0),
                                                    ("ddpm", "eps", 0.0), ("euler", "eps", 0.0), ("euler", "v", 0.0),
                                                    ("dpmpp_2m", "eps", 0.0), ("dpmpp_2m", "v", 0.0)])
@pytest.mark.parametrize("steps", [10, 25])
def test_sampler_matches_diffusers(sampler, prediction, eta, steps):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pt = "epsilon" if prediction == "eps" else "v_prediction"
    ref = {"ddim": lambda: DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, prediction_type=pt),
           "ddpm": lambda: DDPMScheduler(**SD_SCHEDULE, clip_sample=False, prediction_type=pt),
           "euler": lambda: EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=pt),
           "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**SD_SCHEDULE, prediction_type=pt)}[sampler]()
    ours = sdm.NoiseSchedule(sdm.ScheduleConfig(prediction=prediction))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    # diffusers' DPM-Solver spaces "leading" steps by T // (N + 1); give both the same timesteps.
    ts = ours.timesteps(steps)
    kw = {"eta": eta} if sampler == "ddim" else {}
    expect = diffusers_loop(ref, x, steps, torch.Generator().manual_seed(1), ts if sampler == "dpmpp_2m" else None, **kw)
    got = sdm.sample_loop(lambda x, t, i: toy_model(x, t), x, ours, steps, sampler, eta,
                          torch.Generator().manual_seed(1), timesteps=ts, progress=False)
    assert_close(got, expect, rtol=2e-5, atol=2e-5, what=f"{sampler} {prediction} eta={eta}")


def test_zero_terminal_snr_schedule_and_trailing_spacing():
    """Lin et al. 2024: a_999 = 0 with a_0 kept (Alg. 1), trailing timesteps from 999 (Sec. 3.3), as diffusers."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cfg = sdm.ScheduleConfig(prediction="v", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s, plain = sdm.NoiseSchedule(cfg), sdm.NoiseSchedule()
    ref = DDPMScheduler(**{**SD_SCHEDULE, "timestep_spacing": "trailing"}, rescale_betas_zero_snr=True)
    assert s.alphas_cumprod[-1].item() == 0 and abs(s.alphas_cumprod[0].item() - plain.alphas_cumprod[0].item()) < 1e-12
    assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6, what="rescaled alphas_cumprod")
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()
    for steps in (10, 25, 50, 7):
        ddim = DDIMScheduler(**{**SD_SCHEDULE, "timestep_spacing": "trailing"})
        ddim.set_timesteps(steps)
        assert s.timesteps(steps) == ddim.timesteps.tolist(), steps
    assert s.timesteps(50)[:2] == [999, 979] and s.timesteps(50)[-1] == 19
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    assert torch.equal(s.q_sample(x0, t, noise)[3], noise[3]), "x_999 must be pure noise"
    assert_close(s.target(x0, noise, t)[3], -x0[3], what="v at a = 0 is -x0")
    eps, x0_hat = s.eps_x0(s.target(x0, noise, t), s.q_sample(x0, t, noise), t)
    assert_close(x0_hat, x0, atol=1e-3, what="x0") and assert_close(eps, noise, atol=1e-4, what="eps")
    with pytest.raises(ValueError, match="needs v-prediction"):
        sdm.NoiseSchedule(sdm.ScheduleConfig(rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="unknown timestep_spacing 'linspace'"):
        sdm.NoiseSchedule(sdm.ScheduleConfig(timestep_spacing="linspace"))


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_samplers_on_a_zero_terminal_snr_schedule_match_diffusers(sampler):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kw = dict(SD_SCHEDULE, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ref = {"ddim": lambda: DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False),
           "euler": lambda: EulerDiscreteScheduler(**kw),
           "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**kw)}[sampler]()
    ours = sdm.NoiseSchedule(sdm.ScheduleConfig(prediction="v", rescale_betas_zero_snr=True, timestep_spacing="trailing"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = ours.timesteps(20)
    expect = diffusers_loop(ref, x, 20, timesteps=ts if sampler == "dpmpp_2m" else None)
    got = sdm.sample_loop(lambda x, t, i: toy_model(x, t), x, ours, 20, sampler, progress=False, timesteps=ts)
    assert torch.isfinite(got).all()
    assert_close(got, expect, rtol=2e-5, atol=2e-5, what=f"{sampler} on the zero-SNR schedule")


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        sdm.sample_loop(lambda x, t, i: x, torch.zeros(1), sdm.NoiseSchedule(), 2, "plms")
