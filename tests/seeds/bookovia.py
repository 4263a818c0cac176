"""Runs the Bookovia seed's Python code (extracted from the seed page at run time) against
fleetcast. Driven by tests/it/seeds.rs.

The seed page has no Python *client* class: its "Live Vehicle Tracking" example,
``LiveVehicleTracker``, uses a ``BookoviaWebSocketClient(api_key, fleet_id)`` with
``await subscribe(channel, handler)`` and ``await connect()`` that the page never defines.
So the tracker is the seed code under test, and ``BookoviaWebSocketClient`` below is ours:
the smallest client that speaks the documented protocol the way the seed's JavaScript
class does (query-string credential, then an ``auth`` message, then one ``subscribe`` per
channel) and calls ``handler(message["payload"])`` for each event of a subscribed
channel. What this test shows is that the seed's handlers work unchanged on what the
broker delivers (field names and shapes), not that some unseen client does.

Environment: SEED_FILE, SEED_BASE_URL (ws://host:port), SEED_API_KEY, SEED_FLEET_ID,
SEED_TIMEOUT_MS (default 20000). Stdout: one JSON line per event ({"ev": ...}) among the
seed code's own prints. Stdin: EOF ends the run.
"""

import asyncio
import json
import os
import sys

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seedtext  # noqa: E402
from seedtext import emit  # noqa: E402


class BookoviaWebSocketClient:
    """Ours, not the seed's (see the module docstring)."""

    def __init__(self, api_key, fleet_id):
        self.api_key = api_key
        self.fleet_id = fleet_id
        self.handlers = {}
        self.websocket = None
        self.on_dispatched = None

    async def subscribe(self, channel, handler):
        self.handlers[channel] = handler

    async def connect(self):
        base = os.environ["SEED_BASE_URL"]
        url = f"{base}/v1/streaming/websocket?api_key={self.api_key}&fleet_id={self.fleet_id}"
        async with websockets.connect(url) as ws:
            self.websocket = ws
            await ws.send(json.dumps({"type": "auth", "id": "auth", "payload": {"api_key": self.api_key, "fleet_id": self.fleet_id}}))
            for channel in self.handlers:
                await ws.send(json.dumps({"type": "subscribe", "id": f"sub-{channel}", "payload": {"action": "subscribe", "channel": channel}}))
            await ws.send(json.dumps({"type": "ping", "id": "ready"}))
            async for text in ws:
                message = json.loads(text)
                emit("message", msg=message)
                if message.get("type") == "pong" and message.get("id") == "ready":
                    emit("ready")
                handler = self.handlers.get(message.get("channel"))
                if handler:
                    await handler(message["payload"])
                    await self.on_dispatched(message)


async def main():
    namespace = {"__name__": "bookovia_seed", "BookoviaWebSocketClient": BookoviaWebSocketClient}
    try:
        LiveVehicleTracker = seedtext.load_class(os.environ["SEED_FILE"], "LiveVehicleTracker", namespace)
    except seedtext.SeedError as e:
        emit("fatal", message=f"extracting LiveVehicleTracker: {e}")
        return 1

    tracker = LiveVehicleTracker(os.environ["SEED_API_KEY"], os.environ["SEED_FLEET_ID"])

    async def dispatched(message):
        # The tracker's state after its handler ran, as the test checks it.
        vehicle = message["payload"].get("vehicle_id")
        emit(
            "tracker",
            after=message["type"],
            vehicle_positions=tracker.vehicle_positions,
            trace_lengths={v: len(t) for v, t in tracker.route_traces.items()},
            status=await tracker.get_vehicle_status(vehicle) if vehicle else None,
        )

    tracker.ws_client.on_dispatched = dispatched

    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()
    seedtext.watch_stdin(loop, stdin_closed)
    tracking = asyncio.create_task(tracker.start_tracking())
    closed = asyncio.create_task(stdin_closed.wait())
    timeout = int(os.environ.get("SEED_TIMEOUT_MS", "20000")) / 1000
    done, _ = await asyncio.wait({tracking, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if tracking in done:
        e = tracking.exception()
        emit("fatal", message=f"start_tracking ended: {e!r}")
        return 1
    if closed not in done:
        emit("fatal", message=f"harness still running after {timeout} s")
        return 3
    tracking.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
