"""What `int8serve serve` checks before it loads anything, so that a wrong flag fails in a second.

The cards and their chat templates, every model's files (a folder that is no model, a config.json that is not JSON
or does not describe the weights, no tokenizer or one the engine cannot use, a weight file cut short:
engine/model_files.py reads the configs and headers, not the tensors, and builds the tokenizer as the server does),
the serving policy's Redis and database, the port, and the open files `--max-connections` needs. Every model on
disk is checked before a Hub id or the built-in model is fetched (here too, before the server listens), so that a
typo in one `--model` never waits for another's download or load. None of it needs torch, the engine or the HTTP
app, which `server.py` imports only once these checks have passed (importing them alone takes seconds on a small
CPU).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from .catalog.card import CardError, ModelCard
from .catalog.registry import Catalog, UnknownModelError
from .engine.config import ConfigError
from .engine.errors import CheckpointError
from .engine.model_files import check_model_files
from .model_specs import ModelSpec, ModelSpecError, resolve_model, served_model_specs
from .prompt_templates import PromptTemplate, UnknownTemplateError, missing_control_token, template_named
from .service.connections import FdLimitError, raise_fd_limit
from .service.policy import Policy, PolicySettings, PolicyStartupError
from .settings import ServeSettings

__all__ = ["Prepared", "ServeError", "ServedModel", "policy_settings", "prepare"]


class ServeError(Exception):
    """A start-up problem the operator can fix (printed without a traceback)."""


def policy_settings(settings: ServeSettings) -> PolicySettings:
    """The serving policy's part of the settings (validated once, by ServeSettings)."""
    return PolicySettings.model_construct(
        default_rpm=settings.rpm, account_rpm=dict(settings.account_rpm), cache=settings.response_cache,
        cache_ttl=settings.cache_ttl, cache_scope=settings.cache_scope, daily_neurons=settings.daily_neurons,
        redis_url=settings.redis_url, database_url=settings.database_url, data_dir=settings.data_dir,
        database_timeout=settings.database_timeout)


@dataclass
class ServedModel:
    """One model to serve, checked: its card, its chat template and where its weights are."""

    card: ModelCard
    template: PromptTemplate
    model_path: Path
    builtin: bool  # the built-in model (fetched into the cache)


@dataclass
class Prepared:
    """What is checked before the server listens."""

    catalog: Catalog
    models: list[ServedModel]
    policy: Policy


def prepare(settings: ServeSettings) -> Prepared:
    """Check everything `serve` is given before anything loads or listens, in the order that fails fastest: the open
    files the connection limit needs (the soft limit raised to the hard one: `connections.raise_fd_limit`), the
    cards, every model on disk (its files, without loading it: engine/model_files.py), Redis and the database, then
    the models to fetch (the built-in one, Hub ids), checked in turn once fetched, and last the port."""
    try:
        raise_fd_limit(settings.max_connections)
    except FdLimitError as err:
        raise ServeError(str(err)) from None
    try:
        specs = served_model_specs(settings.model, settings.served_model_name)
        catalog = Catalog.load(settings.card)
        cards = [catalog.get(spec.name or "") for spec in specs]
        templates = [_template(card) for card in cards]
    except (CardError, UnknownModelError, ModelSpecError, UnknownTemplateError) as err:
        raise ServeError(str(err)) from err
    # every path on disk before any download: a typo in the last --model fails at once, not after the first's fetch
    paths = {spec: _checked_model(spec, card, template)
             for spec, card, template in zip(specs, cards, templates, strict=True) if not spec.fetched}
    try:  # Redis and the database before any download: a wrong URL fails in a second
        policy = Policy.build(policy_settings(settings))
    except (ValueError, PolicyStartupError) as err:
        raise ServeError(str(err)) from err
    try:
        models = [ServedModel(card=card, template=template, builtin=spec.builtin,
                              model_path=paths[spec] if spec in paths else _checked_model(spec, card, template))
                  for spec, card, template in zip(specs, cards, templates, strict=True)]
        _check_port(settings.host, settings.port)  # last: the flags' own mistakes are said first
    except ServeError:
        policy.close()
        raise
    return Prepared(catalog=catalog, models=models, policy=policy)


def _checked_model(spec: ModelSpec, card: ModelCard, template: PromptTemplate) -> Path:
    """Where `spec`'s weights are (a Hub id or the built-in model is fetched here, before listening), their files
    checked as far as can be without loading them, and the card's template written with their tokenizer (a control
    token it lacks would fail every request); an error names the model and the file at fault."""
    try:
        path = resolve_model(spec)
        tokenizer = check_model_files(path)
    except (CheckpointError, ConfigError) as err:
        raise ServeError(f"model {card.name}: {err}") from err
    missing = missing_control_token(tokenizer, template, card.default_context)
    if missing is not None:
        raise ServeError(f"model {card.name}: its card's prompt template {template.name!r} needs the control token "
                         f"{missing!r}, which the tokenizer of {path} does not have (serve this model under a card "
                         "naming its own template)")
    return path


def _check_port(host: str, port: int) -> None:
    """Fail at once, in one sentence, where uvicorn would fail after printing that it listens (a port in use)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err} (--port, --host)") from None


def _template(card: ModelCard) -> PromptTemplate:
    try:
        return template_named(card.prompt_template)
    except UnknownTemplateError as err:
        raise UnknownTemplateError(f"card {card.source_path}: the model {card.name} needs {err}") from None
