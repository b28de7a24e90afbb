"""pyrovae: variational autoencoders as Pyro programs, with swappable inference objectives.

``pyrovae.load_run(path)`` rebuilds a trained run (:func:`pyrovae.cli.load_run`).
"""
__version__ = "0.1.0"

__all__ = ["load_run", "LoadedRun"]


def __getattr__(name: str):
    if name in ("load_run", "LoadedRun"):  # imported on first use: `import pyrovae` stays light
        import pyrovae.cli as cli

        return getattr(cli, name)
    raise AttributeError(f"module 'pyrovae' has no attribute {name!r}")
