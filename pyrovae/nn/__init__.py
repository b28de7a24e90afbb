"""Building blocks of models and guides (the bottom layer, above :mod:`pyrovae.utils`): layers and MLPs
(:mod:`layers`), normalising flows (:mod:`flows`), likelihood heads (:mod:`likelihoods`), recurrent cells
(:mod:`recurrent`), DRAW's attention (:mod:`attention`), effect handlers (:mod:`poutine`) and layer-size checks
(:mod:`checks`)."""

from pyrovae.nn.layers import (  # noqa: F401
    ACTIVATIONS,
    ALPHA_SHAPES,
    BayesianLinear,
    CLIP_KNEE,
    ConvTrunk,
    DeconvHead,
    Flatten,
    KSW15_C,
    KSW15_CONST,
    MOLCHANOV_K,
    Unflatten,
    VariationalDropoutLinear,
    activation,
    add_dropout_kl,
    bayesian_mlp,
    diag_normal,
    dropout_kl,
    dropout_mlp,
    dropout_neg_kl,
    latent_names,
    linear,
    mlp,
    soft_clip,
    x_decoder,
    x_encoder,
)
