"""The project's Flower apps, found the way Flower finds them: by component string.

``pyproject.toml`` ``[tool.flwr.app.components]`` names the ServerApp and the ClientApp as
``module:attribute`` (what ``flwr run .`` loads); the in-process simulation loads the same
strings with Flower's own loader, so the launcher never imports ``sites`` (the dependency rule,
docs/architecture.md).

Flower's Python simulation entry point hands the apps an empty run config; :func:`with_run_config`
wraps an app so that every call sees the run config ``flwr run`` would have passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common.config import get_project_config
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.object_ref import load_app

#: The project folder (its ``pyproject.toml``): the parent of this package.
PROJECT_DIR = Path(__file__).resolve().parents[1]

Component = Literal["serverapp", "clientapp"]


def component_ref(name: Component, project_dir: Path = PROJECT_DIR) -> str:
    """The ``module:attribute`` string ``[tool.flwr.app.components]`` gives ``name``.

    Args:
        name: "serverapp" or "clientapp".
        project_dir: the folder holding ``pyproject.toml``.
    """
    path = project_dir / "pyproject.toml"
    try:
        doc = get_project_config(project_dir)  # Flower's reader: checks the [tool.flwr.app] fields
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no pyproject.toml, so no [tool.flwr.app.components] to load the "
                                "Flower apps from (run from a checkout, installed with pip install -e .)") from None
    ref = doc["tool"]["flwr"]["app"]["components"].get(name)
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"{path}: [tool.flwr.app.components] {name} = {ref!r} is not a 'module:attribute' string")
    return ref


def load_component(name: Component, project_dir: Path = PROJECT_DIR) -> Any:
    """The app object ``[tool.flwr.app.components]`` names (Flower's loader, as ``flwr run``)."""
    expected = ServerApp if name == "serverapp" else ClientApp
    ref = component_ref(name, project_dir)
    app = load_app(ref, ValueError, project_dir)
    if not isinstance(app, expected):
        raise TypeError(f"[tool.flwr.app.components] {name} = {ref!r} is a {type(app).__name__}, "
                        f"not a {expected.__name__}")
    return app


def _with_config(context: Context, run_config: Mapping[str, Any]) -> Context:
    # The node's own state object: what a site keeps between rounds must persist.
    return Context(run_id=context.run_id, node_id=context.node_id, node_config=context.node_config,
                   state=context.state, run_config=dict(run_config))


class _ClientWithRunConfig(ClientApp):
    """Every message (train, evaluate, query.*) goes to ``inner`` with the run config set."""

    def __init__(self, inner: ClientApp, run_config: Mapping[str, Any]) -> None:
        super().__init__()
        self._inner, self._run_config = inner, dict(run_config)

    def __call__(self, message: Message, context: Context) -> Message:
        return self._inner(message, _with_config(context, self._run_config))


class _ServerWithRunConfig(ServerApp):
    def __init__(self, inner: ServerApp, run_config: Mapping[str, Any]) -> None:
        super().__init__()
        self._inner, self._run_config = inner, dict(run_config)

    def __call__(self, grid: Grid, context: Context) -> None:
        self._inner(grid, _with_config(context, self._run_config))


def client_with_run_config(inner: ClientApp, run_config: Mapping[str, Any]) -> ClientApp:
    """A ClientApp that runs ``inner`` (whatever message types it registers) with ``run_config``
    in place of the context's."""
    return _ClientWithRunConfig(inner, run_config)


def server_with_run_config(inner: ServerApp, run_config: Mapping[str, Any]) -> ServerApp:
    """A ServerApp that runs ``inner`` with ``run_config`` in place of the context's."""
    return _ServerWithRunConfig(inner, run_config)


__all__ = ["PROJECT_DIR", "client_with_run_config", "component_ref", "load_component", "server_with_run_config"]
