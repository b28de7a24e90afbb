"""Evaluation of trained programs: importance-sampled log-likelihood, ELBO terms, active units, samples and
reconstructions (:mod:`likelihood`), GECO-paper analyses (:mod:`analysis`), fixed points
(:mod:`fixed_points`), pictures (:mod:`pictures`) and sentence models (:mod:`text`)."""

from pyrovae.evaluate.likelihood import (  # noqa: F401
    Data,
    LogLikelihood,
    UnitActivity,
    active_units,
    batched_unit_activity,
    count_active,
    decode_grid,
    default_max_elements,
    elbo_terms,
    kl_by_site,
    latent_scatter,
    log_likelihood,
    nll_summary,
    posterior_means,
    reconstruct,
    sample,
    save_image_grid,
    unit_activity,
)
from pyrovae.evaluate.analysis import (  # noqa: F401
    MarginalKL,
    geco_trajectory,
    information_plane,
    marginal_kl,
    refit_gaussian_scale,
)
