"""Pictures, contamination and review commands over a real mosquitto, on the simulated bin
with its real store, site log and photo log in tmp_path."""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from PIL import Image

from bin_controller.config import config_from_dict
from bin_controller.mqtt.retained import LOGGING_GRACE_S, POLL_S
from bin_controller.photolog import comment_seq
from bin_controller.sitelog import SITELOG_NAME, SiteLog
from hardware_sim.simulate import Simulation, sim_config
from hardware_sim.sources import GeneratedSource
from tests.broker import Listener
from tests.conftest import REPO

BASE = "smartbin/t1"
THUMBNAIL_PX = 64  # below the simulated camera's 128 px: the thumbnail is a downscale




def photo_cfg(port: int, state: Path):
    return sim_config(config_from_dict({
        "bin": {"id": "t1", "state_dir": str(state)},
        "photos": {"thumbnail_px": THUMBNAIL_PX},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": port,
                 "stats_interval_s": 1.0}}), fast=True)


class PhotoBin:
    """The simulated bin with MQTT, started and connected; items dropped on demand."""

    def __init__(self, port: int, demo, state: Path) -> None:
        self.port = port
        self.state = state
        self.simulation = Simulation(photo_cfg(port, state), classifier=demo).__enter__()
        smartbin = self.simulation.bin
        self.telemetry, self.photos = smartbin.telemetry, smartbin.photos
        assert self.telemetry.subscribed.wait(10)  # commands and pictures go out from now
        self._seed = 0
        self.requester: Requester | None = None

    def drop(self, n: int) -> None:
        self._seed += 1
        result = self.simulation.drop(GeneratedSource(self._seed).items(n))
        assert not result.timed_out
        assert self.photos.flush()

    def cmd(self, name: str, args: object, *, raw: bytes | None = None) -> dict:
        """Send a command and wait for its reply (commands are answered in order)."""
        if self.requester is None:
            self.requester = Requester(self.port)
        return self.requester.request(name, raw if raw is not None else json.dumps(args).encode())

    def close(self) -> None:
        if self.requester is not None:
            self.requester.close()
        self.simulation.__exit__(None, None, None)


class Requester:
    """A dashboard sending commands: one connection, subscribed to every reply (and the
    photos on reply/review_photo/<seq>), recording what arrives in order."""

    def __init__(self, port: int) -> None:
        self.listener = Listener(port, topic=f"{BASE}/reply/#",
                                 client_id=f"requester-{id(self)}")
        self._sent: dict[str, int] = {}
        # Subscribed once its own probe comes back: no reply can be missed after that.
        probe = f"{BASE}/reply/probe"
        for _ in range(100):
            self.listener.client.publish(probe, b"", qos=1)
            if self.listener.wait_for(lambda li: li.payloads(probe), timeout=0.2):
                break
        else:
            raise AssertionError("the requester never subscribed")

    def send(self, name: str, payload: bytes) -> None:
        self.listener.client.publish(f"{BASE}/cmd/{name}", payload, qos=1) \
            .wait_for_publish(30)

    def reply(self, name: str, count: int, timeout: float = 20.0) -> bytes | None:
        """The `count`-th reply to `name` (1-based), once it arrives."""
        topic = f"{BASE}/reply/{name}"
        if not self.listener.wait_for(lambda li: len(li.payloads(topic)) >= count,
                                      timeout=timeout):
            return None
        return self.listener.payloads(topic)[count - 1]

    def request(self, name: str, payload: bytes) -> dict:
        """Send a command and wait for its reply (commands are answered in order)."""
        self.send(name, payload)
        self._sent[name] = self._sent.get(name, 0) + 1
        reply = self.reply(name, self._sent[name])
        assert reply is not None, f"no reply to {name}"
        return json.loads(reply)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def photo_bin(broker, demo, tmp_path):
    b = PhotoBin(broker.port, demo, tmp_path / "state")
    b.drop(6)
    yield b
    b.close()


# ---------------------------------------------------------------------- checks


def pixels(data: bytes | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img = img.convert("RGB")
        if size is not None:
            img = img.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.float32)


def photo_files(state: Path) -> dict[int, Path]:
    """seq -> its photo on disk, as the site log lists them."""
    db = sqlite3.connect(state / SITELOG_NAME)
    try:
        rows = db.execute("SELECT seq, photo FROM items WHERE photo IS NOT NULL").fetchall()
    finally:
        db.close()
    return {seq: state / "photos" / rel for seq, rel in rows}


def nearest_photo(jpeg: bytes, files: dict[int, Path]) -> int:
    """The seq whose photo, downscaled to the thumbnail's size, differs least from it."""
    thumb = pixels(jpeg)
    size = (thumb.shape[1], thumb.shape[0])
    diffs = {seq: float(np.abs(pixels(path, size) - thumb).mean())
             for seq, path in files.items()}
    return min(diffs, key=diffs.__getitem__)


def pictures(listener: Listener) -> list[tuple[dict, bytes]]:
    """Every `image` received, with the `image/meta` received just before it."""
    out: list[tuple[dict, bytes]] = []
    meta: dict | None = None
    with listener.lock:
        messages = list(listener.messages)
    for topic, payload, _ in messages:
        if topic == f"{BASE}/image/meta":
            meta = json.loads(payload)
        elif topic == f"{BASE}/image":
            assert meta is not None, "an image arrived before any image/meta"
            out.append((meta, payload))
    return out


def check_pictures(listener: Listener, state: Path) -> list[int]:
    """Each picture is its meta's item's, and that item's own photo; the seqs shown."""
    files = photo_files(state)
    events = {json.loads(p)["seq"]: json.loads(p) for p in listener.payloads(f"{BASE}/event")}
    shown = []
    for meta, jpeg in pictures(listener):
        seq = meta["seq"]
        assert comment_seq(jpeg) == seq, (comment_seq(jpeg), meta)
        assert nearest_photo(jpeg, files) == seq
        assert meta["bytes"] == len(jpeg) and meta["content_type"] == "image/jpeg"
        with Image.open(io.BytesIO(jpeg)) as img:
            assert (img.width, img.height) == (meta["width"], meta["height"])
            assert max(img.size) == THUMBNAIL_PX
        event = events[seq]  # the event of that seq arrived
        assert event["photo"] is True
        assert (event["label"], event["bin"]) == (meta["label"], meta["bin"])
        shown.append(seq)
    return shown


def retained(port: int, topics: list[str], client_id: str) -> dict[str, bytes]:
    """What a consumer subscribing now receives for these topics."""
    fresh = Listener(port, topic=f"{BASE}/#", client_id=client_id)
    try:
        assert fresh.wait_for(lambda li: all(t in li.retained for t in topics)), \
            sorted(fresh.retained)
        return {t: fresh.retained[t] for t in topics}
    finally:
        fresh.close()


def newest_with_photo(state: Path) -> int:
    return max(photo_files(state))


# ---------------------------------------------------------------------- pictures


def test_every_picture_is_its_items_under_a_fast_run(broker, demo, tmp_path):
    listener = Listener(broker.port)
    b = PhotoBin(broker.port, demo, tmp_path / "state")
    try:
        b.drop(20)
        assert b.telemetry.drain(30)
        assert listener.wait_for(lambda li: len(li.payloads(f"{BASE}/image")) >= 20
                                 and len(li.payloads(f"{BASE}/event")) >= 20)
    finally:
        b.close()
    assert sorted(set(check_pictures(listener, tmp_path / "state"))) == list(range(1, 21))
    last = retained(broker.port, [f"{BASE}/image/meta", f"{BASE}/image"], "after-run")
    assert json.loads(last[f"{BASE}/image/meta"])["seq"] == 20
    assert comment_seq(last[f"{BASE}/image"]) == 20
    listener.close()


def test_pictures_across_a_broker_outage(broker, demo, tmp_path):
    state = tmp_path / "state"
    listener = Listener(broker.port)
    b = PhotoBin(broker.port, demo, state)
    try:
        b.drop(8)
        assert listener.wait_for(lambda li: len(li.payloads(f"{BASE}/image")) >= 8)
        broker.stop()
        b.drop(6)  # photos written while the broker is away: no picture can go out
        broker.start()
        assert b.telemetry.connected.wait(60)
        assert b.telemetry.drain(60)
        # The events of the outage come from the outbox.
        assert listener.wait_for(lambda li: {json.loads(p)["seq"] for p in li.payloads(
            f"{BASE}/event")} >= set(range(1, 15)), timeout=30)
        newest = newest_with_photo(state)
        assert newest == 14
        # After the reconnect the broker holds the newest picture, and its meta, again.
        last = retained(broker.port, [f"{BASE}/image/meta", f"{BASE}/image"], "after-outage")
        assert json.loads(last[f"{BASE}/image/meta"])["seq"] == newest
        assert comment_seq(last[f"{BASE}/image"]) == newest
        assert nearest_photo(last[f"{BASE}/image"], photo_files(state)) == newest
        b.drop(3)
        assert listener.wait_for(lambda li: any(
            comment_seq(p) == 17 for p in li.payloads(f"{BASE}/image")))
    finally:
        b.close()
    shown = check_pictures(listener, state)
    assert set(range(1, 9)) | {15, 16, 17} <= set(shown)
    listener.close()


# ---------------------------------------------------------------------- review commands


def reviews_table(state: Path) -> tuple[list, list]:
    db = sqlite3.connect(state / SITELOG_NAME)
    try:
        return (db.execute("SELECT * FROM reviews ORDER BY seq").fetchall(),
                db.execute("SELECT * FROM labels ORDER BY name").fetchall())
    finally:
        db.close()


def a_label(demo, *, not_in: str) -> tuple[str, str]:
    """A label of the demo model (and its bin) whose bin is not `not_in`."""
    label = next(lab for lab in demo.bundle.labels if lab.bin != not_in)
    return label.name, label.bin


BAD = [
    ("label", {"seq": 999, "label": "{known}"}, "no item #999 in the site log"),
    ("label", {"seqs": [1, 2, 999], "label": "{known}"}, "no item #999 in the site log"),
    ("label", {"seq": 1, "label": "not a label we know"}, "is new: give its bin too"),
    ("label", {"seq": 1, "label": "a/b", "bin": "other"}, "cannot name a class folder"),
    ("label", {"seq": 1, "label": 7}, "label must be a label's name"),
    ("label", {"seq": 1, "label": "new thing", "bin": "garden"}, "bin 'garden' does not exist"),
    ("label", {"seq": 1, "label": "{known}", "bin": "{other_bin}"}, "belongs to bin"),
    ("label", {"seqs": list(range(1, 2001)), "label": "{known}"},
     "2000 seqs in one request; the limit is 1000"),
    ("label", {"seqs": ["1", 2], "label": "{known}"}, "seq '1' is not an item number"),
    ("label", {"seqs": [1.5], "label": "{known}"}, "seq 1.5 is not an item number"),
    ("label", {"seqs": [True], "label": "{known}"}, "seq True is not an item number"),
    ("label", {"seqs": 3, "label": "{known}"}, "seqs must be a list"),
    ("label", {"seq": [1, 2], "label": "{known}"}, "seq must be one item number"),
    ("label", {"seq": 1, "seqs": [2], "label": "{known}"}, "give exactly one of seq"),
    ("label", {"label": "{known}"}, "give exactly one of seq"),
    ("label", {"seq": 1}, "missing field(s) label"),
    ("label", {"seq": 1, "label": "{known}", "colour": "red"},
     "unexpected field(s) colour; allowed: seq, seqs, label, bin"),
    ("accept", {"seqs": []}, "give at least one seq"),
    ("accept", {"seq": 0}, "seq 0 is not an item number"),
    ("accept", {"seqs": [2, 999]}, "no item #999 in the site log"),
    ("accept", {"seq": 2, "label": "x"}, "unexpected field(s) label"),
    ("review_list", {"limit": 0}, "limit must be a whole number from 1 to 100"),
    ("review_list", {"limit": 101}, "limit must be a whole number from 1 to 100"),
    ("review_list", {"limit": "5"}, "limit must be a whole number from 1 to 100"),
    ("review_list", {"before": 0}, "before must be a whole number from 1"),
    ("review_list", {"uncertain": "yes"}, "uncertain must be true or false"),
    ("review_list", {"bin": "garden"}, "bin 'garden' does not exist"),
    ("review_list", {"page": 2}, "unexpected field(s) page"),
    ("review_photo", {"seq": 999}, "no item #999 in the site log"),
    ("review_photo", {"seq": "1"}, "seq '1' is not an item number"),
    ("review_photo", {}, "missing field(s) seq"),
]


def test_review_commands_refuse_bad_input_and_change_nothing(photo_bin, demo):
    b = photo_bin
    known = demo.bundle.labels[0].name
    other_bin = next(lab.bin for lab in demo.bundle.labels
                     if lab.bin != demo.bundle.labels[0].bin)
    assert b.cmd("accept", {"seq": 3})["ok"]  # a review already there must stay as it is
    before = reviews_table(b.state)
    assert len(before[0]) == 1
    for name, args, error in BAD:
        text = json.dumps(args).replace("{known}", known).replace("{other_bin}", other_bin)
        reply = b.cmd(name, None, raw=text.encode())
        assert reply["ok"] is False, (name, args, reply)
        assert error in reply["error"], (name, args, reply["error"])
        assert "\n" not in reply["error"]
        assert reviews_table(b.state) == before, (name, args)
    # A 10 MB list of seqs: refused at the payload limit, nothing changed.
    huge = b'{"label": "' + known.encode() + b'", "seqs": [' + b"1, " * 3_500_000 + b"1]}"
    assert len(huge) > 10_000_000
    for name in ("label", "accept"):
        reply = b.cmd(name, None, raw=huge)
        assert reply["ok"] is False and "the limit is 65536 bytes" in reply["error"], reply
    assert reviews_table(b.state) == before


def test_review_list_pages_and_filters(photo_bin):
    b = photo_bin
    page = b.cmd("review_list", {"limit": 4})
    assert page["ok"] and page["total"] == 6
    assert [i["seq"] for i in page["items"]] == [6, 5, 4, 3]
    rest = b.cmd("review_list", {"limit": 4, "before": page["next_before"]})
    assert [i["seq"] for i in rest["items"]] == [2, 1] and rest["next_before"] is None
    item = page["items"][0]
    assert {"seq", "time", "label", "confidence", "bin", "compartment", "uncertain", "failed",
            "photo", "review"} <= set(item)
    assert b.cmd("accept", {"seqs": [5, 6]})["ok"]
    unreviewed = b.cmd("review_list", {"unreviewed": True})
    assert [i["seq"] for i in unreviewed["items"]] == [4, 3, 2, 1]
    compartment = item["compartment"]
    in_bin = b.cmd("review_list", {"bin": compartment})
    assert in_bin["items"] and all(compartment in (i["bin"], i["compartment"])
                                   for i in in_bin["items"])


def test_review_photo_sends_the_photo_file_before_its_reply(photo_bin):
    b = photo_bin
    reply = b.cmd("review_photo", {"seq": 4, "id": "p4"})
    photo_topic = f"{BASE}/reply/review_photo/4"
    assert reply == {"ok": True, "seq": 4, "topic": photo_topic, "bytes": reply["bytes"],
                     "command": "review_photo", "id": "p4"}
    assert b.requester is not None
    with b.requester.listener.lock:
        messages = list(b.requester.listener.messages)
    order = [t for t, _, _ in messages]
    # The photo was there when the reply came: sent first, on its own topic, not retained.
    assert order.index(photo_topic) < order.index(f"{BASE}/reply/review_photo")
    ((photo, was_retained),) = [(p, r) for t, p, r in messages if t == photo_topic]
    on_disk = photo_files(b.state)[4].read_bytes()
    assert photo == on_disk and len(photo) == reply["bytes"] and not was_retained
    assert comment_seq(photo) == 4
    other = b.cmd("review_photo", {"seq": 2})
    assert b.requester.listener.payloads(other["topic"]) == [
        photo_files(b.state)[2].read_bytes()]


# ---------------------------------------------------------------------- contamination


def wait_counts(port: int, client_id: str, **expected: object) -> dict:
    """The retained counts once they hold `expected` (their fields), as a consumer
    subscribing now sees them and then their updates."""
    listener = Listener(port, topic=f"{BASE}/counts", client_id=client_id)

    def holds(li: Listener) -> bool:
        counts = json.loads(li.retained.get(f"{BASE}/counts") or b"{}")
        return all(counts.get(k) == v for k, v in expected.items())

    try:
        assert listener.wait_for(holds, timeout=20), \
            (listener.retained.get(f"{BASE}/counts"), expected)
        return json.loads(listener.retained[f"{BASE}/counts"])
    finally:
        listener.close()


def test_label_and_accept_change_the_retained_contamination_across_a_restart(
        broker, demo, tmp_path):
    state = tmp_path / "state"
    b = PhotoBin(broker.port, demo, state)
    try:
        b.drop(8)
        counts = wait_counts(broker.port, "counts-0", total=8)
        assert counts["contamination"]["total"] == {"reviewed": 0, "wrong": 0, "rate": None}
        first = b.photos.sitelog.item(1)
        assert first is not None
        wrong_label, wrong_bin = a_label(demo, not_in=first.bin)
        # Past the tick's re-reads after the last item: only the command's own republish
        # can carry a verdict to the counts now.
        time.sleep(LOGGING_GRACE_S + 2 * POLL_S)
        done = b.cmd("label", {"seq": 1, "label": wrong_label})
        assert done["ok"] and done["wrong"] == 1 and done["bin"] == wrong_bin
        labelled = b.photos.sitelog.contamination()
        assert labelled["total"] == {"reviewed": 1, "wrong": 1, "rate": 1.0}
        wait_counts(broker.port, "counts-label", contamination=labelled)
        assert b.cmd("accept", {"seqs": [2, 3]})["ok"]
        expected = b.photos.sitelog.contamination()
        assert expected["total"] == {"reviewed": 3, "wrong": 1, "rate": round(1 / 3, 4)}
        assert expected[first.bin]["wrong"] == 1
        # The counts themselves never change: they are what physically happened.
        wait_counts(broker.port, "counts-1", contamination=expected, total=8)
        # A review made by another process (as `smartbin review` does) reaches the
        # retained counts within seconds.
        script = ("import sys; from bin_controller.sitelog import SiteLog; "
                  "from bin_controller.review import Reviews; "
                  "from pathlib import Path; s = SiteLog(sys.argv[1]); "
                  "Reviews(s, Path(sys.argv[1]) / 'photos', lambda: []).accept([4], "
                  "source='cli'); s.close()")
        r = subprocess.run([sys.executable, "-c", script, str(state)], cwd=REPO,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        expected = b.photos.sitelog.contamination()
        assert expected["total"]["reviewed"] == 4
        wait_counts(broker.port, "counts-2", contamination=expected)
        in_stats = b.telemetry.stats()
        assert in_stats["contamination"] == expected and "photos_mb" in in_stats
    finally:
        b.close()
    # The next run of the bin publishes the same contamination from the same state.
    with contextlib.closing(SiteLog(state)) as sitelog:
        stored = sitelog.contamination()
    assert stored == expected
    clear = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2)
    clear.connect("127.0.0.1", broker.port)
    clear.loop_start()
    clear.publish(f"{BASE}/counts", b"", qos=1, retain=True).wait_for_publish(5)
    clear.loop_stop()
    clear.disconnect()
    again = PhotoBin(broker.port, demo, state)
    try:
        wait_counts(broker.port, "counts-3", contamination=expected, total=8)
    finally:
        again.close()

