#!/usr/bin/env python3
"""A device outside Rust, written from PROTOCOL.md alone (msgpack, websockets, paho-mqtt).

It is driven one command per line on standard input and answers one line on standard output
(`fail <why>` when something does not hold), so that a test (tests/tests/conformance.rs) can
do the cloud's side in between:

    register <enrollment token>   -> registered <device id>
    mqtt                          -> mqtt_up              (subscribed, presence announced)
    hint_job                      -> done <job id> <hint kind>   (a hint, then the data channel)
    mqtt_off                      -> mqtt_down            (a clean DISCONNECT: no last will)
    poll_job                      -> polling, then done <job id>  (a long-poll, no MQTT)
    status                        -> status_ok            (consent and a status, by outbox and directly)
    errors                        -> errors_ok            (the documented error cases)
    quit
"""

import argparse
import queue
import secrets
import sys
import time

import msgpack
import paho.mqtt.client as mqtt
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect


def pack(value):
    # Section 2: maps with field names, bytes as bin.
    return msgpack.packb(value, use_bin_type=True)


def unpack(data):
    return msgpack.unpackb(data, raw=False)


def now_ms():
    return int(time.time() * 1000)


class Fail(Exception):
    pass


class RequestError(Exception):
    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


class Refused(Exception):
    """A connection-level error (id nil) and the close code that followed (section 6)."""

    def __init__(self, code, close):
        super().__init__(f"{code}, close {close}")
        self.code = code
        self.close = close


class Channel:
    """The data channel (sections 1, 3, 4): one WebSocket, binary MessagePack frames."""

    def __init__(self, url, auth):
        self.ws = connect(url, max_size=1 << 20, open_timeout=10)
        self.next_id = 0
        self.send({"hello": {"protocol": 1, "auth": auth, "agent": "conformance.py/1"}})
        frame = self.recv(10)
        if "welcome" not in frame:
            raise Fail(f"expected a welcome, got {frame}")
        self.welcome = frame["welcome"]

    def send(self, frame):
        self.ws.send(pack(frame))

    def recv(self, timeout):
        try:
            data = self.ws.recv(timeout=timeout)
        except ConnectionClosed as closed:
            raise Refused(None, closed.rcvd.code if closed.rcvd else None) from None
        if isinstance(data, str):
            raise Fail("the bridge sent a text message")
        frame = unpack(data)
        error = frame.get("error")
        if error is not None and error["id"] is None:
            code = error["error"]["code"]
            try:
                self.ws.recv(timeout=5)
                close = None
            except ConnectionClosed as closed:
                close = closed.rcvd.code if closed.rcvd else None
            raise Refused(code, close)
        return frame

    def request(self, body):
        """Sends a request; returns its id."""
        self.next_id += 1
        self.send({"request": {"id": self.next_id, "body": body}})
        return self.next_id

    def answer(self, request_id, timeout=40):
        """The answer to `request_id`: the response's body, or RequestError."""
        while True:
            frame = self.recv(timeout)
            if "event" in frame:
                continue
            if "response" in frame and frame["response"]["id"] == request_id:
                return frame["response"]["body"]
            if "error" in frame and frame["error"]["id"] == request_id:
                error = frame["error"]["error"]
                raise RequestError(error["code"], error["message"])

    def call(self, body, timeout=40):
        return self.answer(self.request(body), timeout)

    def close(self):
        self.ws.close()


def kind_of(body):
    """The kind of a value tagged by key (section 2, form 1)."""
    return body if isinstance(body, str) else next(iter(body))


class Device:
    def __init__(self, data_url, mqtt_host, mqtt_port):
        self.data_url = data_url
        self.mqtt_host, self.mqtt_port = mqtt_host, mqtt_port
        self.device_id = None
        self.secret = None
        self.cursor = 0
        self.done = {}  # job id -> the outcome, kept before it is reported (section 7)
        self.outbox_no = 0
        self.hints = queue.Queue()
        self.mqtt = None

    def auth(self):
        return {"device": {"device_id": self.device_id, "secret": self.secret}}

    def channel(self):
        return Channel(self.data_url, self.auth())

    # -- registration (section 3) --

    def register(self, token):
        registration_id = secrets.token_urlsafe(24)[:32]  # stored before the first try
        registration = {
            "enrollment_token": token,
            "serial": "PY-" + secrets.token_hex(4),
            "model": "PyPrinter",
            "destination": "EU",
            "time_zone": "Europe/Berlin",
            "registration_id": registration_id,
        }
        ch = Channel(self.data_url, {"register": registration})
        self.device_id = ch.welcome["device_id"]
        self.secret = ch.welcome["credentials"]
        if not self.secret:
            raise Fail("no credentials in the welcome of a registration")
        self.cursor = ch.welcome["acked"]
        answer = ch.call("complete_registration")
        if kind_of(answer) != "registration_completed":
            raise Fail(f"complete_registration answered {answer}")
        ch.close()
        return f"registered {self.device_id}"

    # -- MQTT (section 9) --

    def mqtt_on(self):
        up = queue.Queue()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.device_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(self.device_id, self.secret)
        presence = f"devices/{self.device_id}/presence"
        notify = f"devices/{self.device_id}/notify"
        client.will_set(presence, pack("offline"), qos=1, retain=False)

        def on_connect(c, userdata, flags, reason, properties):
            if reason.is_failure:
                up.put(f"fail CONNACK {reason}")
                return
            c.subscribe(notify, qos=1)

        def on_subscribe(c, userdata, mid, reasons, properties):
            if any(r.is_failure for r in reasons):
                up.put("fail SUBACK refused")
                return
            info = c.publish(presence, pack("online"), qos=1, retain=False)
            up.put(info)

        def on_message(c, userdata, message):
            if message.topic != notify or len(message.payload) > 256:
                return
            hint = unpack(message.payload)
            self.hints.put(hint)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect(self.mqtt_host, self.mqtt_port, keepalive=30)
        client.loop_start()
        got = up.get(timeout=20)
        if isinstance(got, str):
            raise Fail(got)
        got.wait_for_publish(timeout=10)
        self.mqtt = client
        return "mqtt_up"

    def mqtt_off(self):
        self.mqtt.disconnect()
        self.mqtt.loop_stop()
        self.mqtt = None
        return "mqtt_down"

    # -- the feed and jobs (sections 5 and 7) --

    def handle(self, ch, entries):
        """Handles feed entries; returns the jobs run."""
        ran = []
        for entry in entries:
            body = entry["body"]
            if body.get("kind") == "job_offered" and body["job_id"] not in self.done:
                job_id = body["job_id"]
                offer = ch.call({"fetch_job": {"job_id": job_id, "start": True}})["job"]
                if not isinstance(offer["payload"], bytes):
                    raise Fail("the payload is not bin")
                outcome = {"succeeded": {"detail": f"{len(offer['payload'])} bytes printed"}}
                self.done[job_id] = (offer["attempt"], outcome)
                state = ch.call(
                    {
                        "job_update": {
                            "job_id": job_id,
                            "attempt": offer["attempt"],
                            "update": outcome,
                        }
                    }
                )["job_state"]
                if state["state"] != "succeeded":
                    raise Fail(f"the job is {state['state']} after succeeded")
                ran.append(job_id)
            self.cursor = entry["seq"]
        return ran

    def sync(self, ch, wait_ms):
        answer = ch.call(
            {"sync": {"after": self.cursor, "wait_ms": wait_ms, "limit": 16, "ack": self.cursor}},
            timeout=wait_ms / 1000 + 10,
        )
        return answer["feed"]["entries"]

    def hint_job(self):
        # A hint at or below the cursor is stale (kept by the broker while the device was
        # away, for work already done): skip it.
        hint = self.hints.get(timeout=30)
        while hint["seq"] <= self.cursor:
            hint = self.hints.get(timeout=30)
        if hint.get("v") != 1:
            raise Fail(f"unexpected hint {hint}")
        ch = self.channel()
        ran = self.handle(ch, self.sync(ch, 0))
        ch.call({"ack": {"upto": self.cursor}})
        ch.close()
        if len(ran) != 1:
            raise Fail(f"ran {ran} after the hint")
        return f"done {ran[0]} {hint['kind']}"

    def poll_job(self):
        ch = self.channel()
        request_id = ch.request(
            {"sync": {"after": self.cursor, "wait_ms": 25000, "limit": 16, "ack": self.cursor}}
        )
        print("polling", flush=True)
        entries = ch.answer(request_id, timeout=35)["feed"]["entries"]
        ran = self.handle(ch, entries)
        ch.call({"ack": {"upto": self.cursor}})
        ch.close()
        if len(ran) != 1:
            raise Fail(f"ran {ran} after the long-poll")
        return f"done {ran[0]}"

    # -- device information (section 4: report_status, deliver) --

    def status(self):
        ch = self.channel()
        made = now_ms()
        items = []
        for body in (
            {"kind": "consent", "granted": True, "changed_at": made},
            {
                "kind": "status",
                "status": {"state": "idle", "detail": "ready", "observed_at": made},
            },
        ):
            self.outbox_no += 1
            items.append({"no": self.outbox_no, "made_at": made, "body": body})
        delivered = ch.call({"deliver": {"items": items}})["delivered"]
        if delivered["upto"] != self.outbox_no or delivered["refused"]:
            raise Fail(f"delivered {delivered}")
        # The same items again change nothing.
        again = ch.call({"deliver": {"items": items}})["delivered"]
        if again["upto"] != self.outbox_no:
            raise Fail(f"delivered again {again}")
        accepted = ch.call(
            {"report_status": {"status": {"state": "busy", "detail": "printing", "observed_at": now_ms()}}}
        )
        if kind_of(accepted) != "status_accepted":
            raise Fail(f"report_status answered {accepted}")
        ch.close()
        return "status_ok"

    # -- the documented error cases (sections 6 and 8) --

    def expect_refused(self, frames, code, close):
        ws = connect(self.data_url, open_timeout=10)
        try:
            for f in frames:
                ws.send(f)
            while True:
                frame = unpack(ws.recv(timeout=10))
                if "error" in frame and frame["error"]["id"] is None:
                    got = frame["error"]["error"]["code"]
                    if got != code:
                        raise Fail(f"expected {code}, got {got}")
        except ConnectionClosed as closed:
            got_close = closed.rcvd.code if closed.rcvd else None
            if got_close != close:
                raise Fail(f"expected close {close} for {code}, got {got_close}")

    def expect_error(self, ch, body, code):
        try:
            answer = ch.call(body)
        except RequestError as e:
            if e.code != code:
                raise Fail(f"{kind_of(body)}: expected {code}, got {e}") from None
            return
        raise Fail(f"{kind_of(body)}: expected {code}, got {answer}")

    def errors(self):
        hello = lambda auth, protocol=1: pack(  # noqa: E731
            {"hello": {"protocol": protocol, "auth": auth, "agent": "conformance.py/1"}}
        )
        wrong = {"device": {"device_id": self.device_id, "secret": "not-the-secret"}}
        self.expect_refused([hello(wrong)], "unauthorized", 4401)
        self.expect_refused([hello(self.auth(), protocol=99)], "unsupported_version", 4426)
        self.expect_refused(["hello as text"], "bad_frame", 4400)
        self.expect_refused([b"\xc1"], "bad_frame", 4400)
        used = {
            "register": {
                "enrollment_token": "no-such-token",
                "serial": "PY-X",
                "model": "PyPrinter",
                "destination": "EU",
                "time_zone": "UTC",
            }
        }
        self.expect_refused([hello(used)], "enrollment_invalid", 4401)

        ch = self.channel()
        # Per request, and the channel goes on (section 8).
        self.expect_error(ch, "teleport", "unknown_request")
        self.expect_error(ch, {"fly_to": {"x": 1}}, "unknown_request")
        self.expect_error(ch, {"fetch_job": {"job_id": "not-an-id"}}, "bad_request")
        self.expect_error(
            ch,
            {"job_update": {"job_id": "job-0000000000000000", "attempt": 1, "update": "paused"}},
            "bad_request",
        )
        self.expect_error(ch, {"fetch_job": {"job_id": "job-0000000000000000"}}, "not_found")
        self.expect_error(ch, {"ack": {"upto": self.cursor + 1000}}, "bad_request")
        acked = ch.call({"ack": {"upto": self.cursor, "a_field_from_the_future": True}})
        if acked["acked"]["acked"] != self.cursor:
            raise Fail(f"ack answered {acked}")
        ch.close()
        return "errors_ok"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-url", required=True)
    parser.add_argument("--mqtt", required=True, help="host:port")
    args = parser.parse_args()
    host, port = args.mqtt.rsplit(":", 1)
    device = Device(args.data_url, host, int(port))
    commands = {
        "register": device.register,
        "mqtt": device.mqtt_on,
        "mqtt_off": device.mqtt_off,
        "hint_job": device.hint_job,
        "poll_job": device.poll_job,
        "status": device.status,
        "errors": device.errors,
    }
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            print(commands[words[0]](*words[1:]), flush=True)
        except Exception as e:  # every failure is an answer the test reports
            print(f"fail {words[0]}: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
