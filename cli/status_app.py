"""The live status TUI (Textual): peers, plan and events of one daemon, polled over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any, ClassVar

import httpx
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.coordinate import Coordinate
from textual.widgets import DataTable, Footer, Static, TabbedContent, TabPane

from hexgen.cli.status import (
    EVENT_COLUMNS,
    FETCH_TIMEOUT_S,
    GROUP_COLUMNS,
    MISSING,
    PEER_COLUMNS,
    Row,
    StatusError,
    event_rows,
    fetch_status,
    flow_lines,
    group_rows,
    header_text,
    peer_rows,
    plan_summary,
    serving_summary,
)


def fill(widget: DataTable[Text], rows: list[Row]) -> None:
    """Show ``rows``; cells change in place when the keys are the same, so the cursor and scroll stay.

    Cells go in as ``Text``: DataTable reads a plain string as markup, and host names and event texts
    come from peers (a host named "[/]" would otherwise stop the app)."""
    if [key.value for key in widget.rows] == [row.key for row in rows]:
        for y, row in enumerate(rows):
            for x, cell in enumerate(row.cells):
                if str(widget.get_cell_at(Coordinate(y, x))) != cell:
                    widget.update_cell_at(Coordinate(y, x), Text(cell), update_width=True)
        return
    cursor = widget.cursor_row
    widget.clear()
    for row in rows:
        widget.add_row(*map(Text, row.cells), key=row.key)
    if rows:
        widget.move_cursor(row=min(cursor, len(rows) - 1))


class StatusApp(App[None]):
    """Peers, plan and events of one daemon, refreshed every ``interval`` seconds."""

    TITLE = "hexgen-node status"
    CSS = """
    #header { height: auto; padding: 0 1; background: $primary-background; text-style: bold; }
    #plan-summary { height: auto; padding: 0 1; background: $primary-background; }
    #connection { height: auto; padding: 0 1; color: $text-muted; }
    #connection.error { color: $text-error; background: $error-muted; text-style: bold; }
    #views, #views ContentSwitcher, #views TabPane { height: 1fr; }
    #serving, #flows { height: auto; padding: 0 1; }
    #flows-title { height: auto; padding: 1 1 0 1; text-style: bold; }
    #groups { height: auto; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("tab", "switch_view(1)", "Next view", priority=True),
        Binding("shift+tab", "switch_view(-1)", "Previous view", priority=True),
    ]
    VIEWS = ("peers-view", "plan-view", "events-view")

    def __init__(self, url: str, interval: float) -> None:
        super().__init__()
        self.url = url
        self.interval = interval
        self.polls = 0  # completed polls, successful or not
        self.status: dict[str, Any] | None = None  # the latest status received
        self.error: str | None = None  # why the latest poll failed, None after a success
        self._polled = asyncio.Condition()

    def compose(self) -> ComposeResult:
        yield Static(f"hexgen-node status: connecting to {self.url} …", id="header", markup=False)
        yield Static("", id="plan-summary", markup=False)
        yield Static("", id="connection", markup=False)
        with TabbedContent(id="views", initial=self.VIEWS[0]):
            with TabPane("Peers", id="peers-view"):
                yield DataTable(id="peers", zebra_stripes=True, cursor_type="row")
            with TabPane("Plan", id="plan-view"), VerticalScroll():
                yield Static("", id="serving", markup=False)
                yield DataTable(id="groups", zebra_stripes=True, cursor_type="row")
                yield Static("flows", id="flows-title")
                yield Static(MISSING, id="flows", markup=False)
            with TabPane("Events", id="events-view"):
                yield DataTable(id="events", zebra_stripes=True, cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        for table_id, columns in (("#peers", PEER_COLUMNS), ("#groups", GROUP_COLUMNS), ("#events", EVENT_COLUMNS)):
            self.query_one(table_id, DataTable).add_columns(*columns)
        self.run_worker(self._poll_forever(), name="poll", exclusive=True)

    async def _poll_forever(self) -> None:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_S) as client:
            while True:
                try:
                    status: dict[str, Any] | str = await fetch_status(client, self.url)
                except StatusError as exc:
                    status = str(exc)
                if not self.is_running:  # quitting: the app's workers outlive its screen by a moment
                    return
                if isinstance(status, dict):
                    self.show_status(status)
                else:
                    self.show_error(status)
                async with self._polled:
                    self.polls += 1
                    self._polled.notify_all()
                await asyncio.sleep(self.interval)

    async def polled(self, count: int) -> None:
        """Return once ``count`` polls have completed (for tests and scripts driving the app)."""
        async with self._polled:
            await self._polled.wait_for(lambda: self.polls >= count)

    def show_status(self, status: dict[str, Any]) -> None:
        """Render a fresh status into the header, the summary, the connection line and every view."""
        self.status, self.error = status, None
        self.query_one("#header", Static).update(header_text(status))
        line = self.query_one("#connection", Static)
        line.remove_class("error")
        line.update(
            f"{self.url}/status at {time.strftime('%H:%M:%S')}, refreshed every {self.interval:g} s"
            " · tab: next view · q: quit"
        )
        fill(self.query_one("#peers", DataTable), peer_rows(status))
        self.query_one("#plan-summary", Static).update(plan_summary(status))
        self.query_one("#serving", Static).update(serving_summary(status))
        fill(self.query_one("#groups", DataTable), group_rows(status))
        self.query_one("#flows", Static).update("\n".join(flow_lines(status)) or MISSING)
        # newest first, so the latest events are on screen without scrolling
        fill(self.query_one("#events", DataTable), event_rows(status)[::-1])

    def show_error(self, message: str) -> None:
        """Say why the latest poll failed; the views keep the last status received, if any."""
        self.error = message
        stale = "; the tables show the last status received" if self.status is not None else ""
        line = self.query_one("#connection", Static)
        line.add_class("error")
        line.update(f"{message} (retrying every {self.interval:g} s{stale})")

    def action_switch_view(self, step: int) -> None:
        """Show the next (``step`` 1) or previous (-1) view, wrapping around."""
        views = self.query_one("#views", TabbedContent)
        current = self.VIEWS.index(views.active) if views.active in self.VIEWS else 0
        views.active = self.VIEWS[(current + step) % len(self.VIEWS)]
