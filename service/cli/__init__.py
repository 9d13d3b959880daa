"""The ``modret`` console entry point: one typer app, subcommands as plain typed functions whose
defaults are the documented options. Exit codes: ``service.cli.common``."""

from __future__ import annotations

import typer

from service.cli import demo, index, serve, task, train

app = typer.Typer(help="Attribute-conditioned image retrieval with modulation modules.", no_args_is_help=True)
app.command()(train.train)
app.command("eval")(train.eval_)
app.command()(train.compare)
app.command()(train.diagnose)
app.add_typer(index.index_app, name="index")
app.add_typer(task.task_app, name="task")
app.command()(serve.serve)
app.command()(demo.demo)
