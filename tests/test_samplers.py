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


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler"):
        sdm.sample_loop(lambda x, t, i: x, torch.zeros(1), sdm.NoiseSchedule(), 2, "plms")
