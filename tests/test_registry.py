"""The CLI's registries: one list of objectives (``pyrovae.objectives.OBJECTIVES``), which the CLI reads."""
import pyrovae.cli.registry as registry
from pyrovae.objectives import OBJECTIVES, make_objective


def test_every_cli_objective_builds_with_make_objective():
    # the CLI used to list 9 objectives and make_objective 7: make_objective("annealed") raised
    assert list(registry.OBJECTIVES) == list(OBJECTIVES) and {"annealed", "token-geco"} <= set(OBJECTIVES)
    for name, entry in registry.OBJECTIVES.items():
        obj = make_objective(name)
        assert type(obj) is entry.build is OBJECTIVES[name]
        assert type(registry.build_objective({"objective": name})) is type(obj)
