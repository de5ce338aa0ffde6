"""The diffusion core: Gaussian diffusion, respacing, timestep samplers, likelihood terms."""
