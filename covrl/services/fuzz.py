"""A reflection-driven fuzzer for covrl's gRPC servers (tests/services/test_fuzz.py, benchmarks/bench_fuzz.py).

:func:`discover` lists every RPC a server offers through server reflection (the request
types come from the server, not from covrl's generated code). :class:`Fuzzer` then sends
random and malformed requests: random values of every field type (huge / NaN / Inf floats,
negative and extreme ints, unknown enum values, long and odd strings, path-like strings,
addresses), mutations of valid seed requests (so a request gets past the first check and
reaches the deeper ones: wrong tensor metadata, one bad field in a good batch), empty and
reordered streams, and truncated / garbage bytes. Each answer is checked:

- no UNKNOWN or INTERNAL status, and the server keeps answering (no crash);
- every INVALID_ARGUMENT's message starts with ``<field>: `` where every name in the field
  path is a field or message name of the request (:func:`names_its_field`).

Filesystem checks (nothing written outside the configured directories) are the caller's:
the test and the benchmark snapshot their directories around the run.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import re
import struct
import time

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

# Framework services: reflection is grpc's own code; Health/Watch is an endless stream.
SKIP = {"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection",
        "/grpc.health.v1.Health/Watch"}
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNIMPLEMENTED,
             grpc.StatusCode.DATA_LOSS}

INT_RANGES = {
    FD.TYPE_INT32: (-2**31, 2**31 - 1), FD.TYPE_SINT32: (-2**31, 2**31 - 1), FD.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    FD.TYPE_INT64: (-2**63, 2**63 - 1), FD.TYPE_SINT64: (-2**63, 2**63 - 1), FD.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-45, 1e-300, 3.4e38, -3.4e38, 1e300, float("nan"), float("inf"),
          float("-inf"), 1e9, -1e9, 100.0]
BASE_STRINGS = [
    "", " ", "a", "0", "4", "-1", "nan", "inf", "1e999", "What is 2+2?", "\\boxed{9**9**9**9}", "9**9**9**9",
    "../../../../etc/passwd", "..", ".", "./x", "a/b", "a\\b", "/", "/etc/passwd", "C:\\Windows\\x", "~/x",
    "file:///etc/passwd", "\\\\server\\share\\x", "x\x00y", "\x00", "%s%s%n", "{{7*7}}", "{% raw %}",
    "\u202eevil", "\U0001F600" * 8, "\t\n\r", "a" * 300, "a" * 5000, "z" * 70000, "step_1", "nan/", "4/",
    "What is 2+2?/", "model.safetensors", "learner_state.json",
    "float32", "bfloat16", "float16", "int64", "bool", "complex64", "math", "arithmetic", "countdown", "format",
    "user", "system", "assistant", "{}", "[]", "null", "1", '"x"', '{"numbers": [1, 2, 3], "target": 6}',
    '{"a": ' * 3000 + "1" + "}" * 3000, "[" * 100000, "127.0.0.1:1", "localhost:0", "[::1]:65536", "[::1]:1",
    "10.0.0.1:50051", "0.0.0.0:80", "evil.example:443", "http://127.0.0.1:1", "unix:/tmp/x.sock",
    "kl_coef", "kl_cov_fraction", "clip_cov_fraction", "entropy_coef", "lr", "clip_low", "seed", "__class__",
]


@dataclasses.dataclass
class Method:
    """One RPC as the server describes it."""

    path: str  # /package.Service/Method
    input: object  # google.protobuf Descriptor of the request
    cls: type  # the request message class built from the reflected descriptor
    client_streaming: bool
    server_streaming: bool

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def discover(channel: grpc.Channel, skip: set[str] = SKIP) -> list[Method]:
    """Every RPC of every service the server lists through reflection (minus ``skip``)."""
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    out = []
    for svc_name in sorted(db.get_services()):
        if svc_name in skip:
            continue
        svc = pool.FindServiceByName(svc_name)
        for m in svc.methods:
            path = f"/{svc.full_name}/{m.name}"
            if path in skip:
                continue
            out.append(Method(path, m.input_type, message_factory.GetMessageClass(m.input_type),
                              bool(m.client_streaming), bool(m.server_streaming)))
    return out


def known_names(desc, seen=None) -> set[str]:
    """Field and message names reachable from message descriptor ``desc``."""
    seen = set() if seen is None else seen
    if desc.full_name in seen:
        return set()
    seen.add(desc.full_name)
    names = {desc.name}
    for f in desc.fields:
        names.add(f.name)
        if f.message_type is not None:
            names |= known_names(f.message_type, seen)
    return names


_INDEX = r"""\[(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\]'"]*)\]"""  # [3], ['a]: b'] (a repr)
_FIELD_PREFIX = re.compile(rf"([A-Za-z_]\w*(?:{_INDEX})*(?:[./][A-Za-z_]\w*(?:{_INDEX})*)*): ")


def names_its_field(details: str, desc) -> bool:
    """True when ``details`` starts with a field path of the request: ``prompts[2].token_ids.ids: ...``."""
    m = _FIELD_PREFIX.match(details or "")
    if not m:
        return False
    names = known_names(desc)
    tokens = re.split(r"[./]", re.sub(_INDEX, "", m.group(1)))
    return all(t in names for t in tokens)


class Fuzzer:
    """Random / mutated / garbage requests for :class:`Method` s, from one seeded RNG.

    ``seeds`` maps a method path to valid requests (lists of messages for client streams) the
    fuzzer mutates; ``strings`` adds to the string corpus (e.g. addresses and paths of the run).
    """

    def __init__(self, seed: int = 0, seeds: dict | None = None, strings: list[str] | None = None):
        self.rng = random.Random(seed)
        self.seeds = seeds or {}
        self.strings = BASE_STRINGS + list(strings or [])

    # ------------------------------------------------------------------ values
    def _int(self, ftype) -> int:
        lo, hi = INT_RANGES.get(ftype, (-2**31, 2**31 - 1))
        r = self.rng.random()
        if r < 0.3:
            return self.rng.choice([v for v in (0, 1, 2, 3, 7, 64, lo, hi, -1, -2, 2**31 - 1, 2**32, 49151, 49152)
                                    if lo <= v <= hi])
        if r < 0.8:
            return max(lo, min(hi, self.rng.randint(-5, 300)))
        return self.rng.randint(lo, hi)

    def _str(self) -> str:
        r = self.rng.random()
        if r < 0.75:
            return self.rng.choice(self.strings)
        n = self.rng.choice([1, 3, 10, 100, 2000])
        if r < 0.9:
            return "".join(self.rng.choice("abcxyz0123456789 ./\\_-:+*{}[]()\"'") for _ in range(n))
        return "".join(chr(self.rng.choice([self.rng.randint(1, 0xD7FF), self.rng.randint(0xE000, 0x10FFFF)]))
                       for _ in range(n))

    def _bytes(self) -> bytes:
        r = self.rng.random()
        if r < 0.2:
            return b""
        if r < 0.4:
            return b"-----BEGIN CERTIFICATE-----\nMIIB" + self.rng.randbytes(40) + b"\n-----END CERTIFICATE-----\n"
        if r < 0.5:
            return struct.pack("<4f", float("nan"), float("inf"), 1.0, -0.0)
        return self.rng.randbytes(self.rng.choice([1, 2, 3, 4, 7, 8, 16, 100, 4096]))

    def value(self, f):
        t = f.type
        if t == FD.TYPE_BOOL:
            return self.rng.random() < 0.5
        if t in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            v = self.rng.choice(FLOATS) if self.rng.random() < 0.7 else self.rng.uniform(-10, 10)
            return min(max(v, -3.4e38), 3.4e38) if t == FD.TYPE_FLOAT and abs(v) != float("inf") and v == v else v
        if t == FD.TYPE_STRING:
            return self._str()
        if t == FD.TYPE_BYTES:
            return self._bytes()
        if t == FD.TYPE_ENUM:
            values = [v.number for v in f.enum_type.values]
            return self.rng.choice(values + [99, -1, 2**31 - 1])
        return self._int(t)

    # ------------------------------------------------------------------ messages
    def fill(self, msg, depth: int = 0, p_set: float = 0.6) -> None:
        """Set a random subset of ``msg``'s fields to random values (in place)."""
        desc = msg.DESCRIPTOR
        oneofs_done = set()
        for f in desc.fields:
            if f.containing_oneof is not None:
                if f.containing_oneof.name in oneofs_done or self.rng.random() < 0.5:
                    continue
                oneofs_done.add(f.containing_oneof.name)
            elif self.rng.random() > p_set:
                continue
            self.set_field(msg, f, depth)

    def _count(self) -> int:
        return self.rng.choice([0, 1, 1, 2, 3, 5, 17, 300]) if self.rng.random() < 0.97 else 3000

    def set_field(self, msg, f, depth: int) -> None:
        try:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                target = getattr(msg, f.name)
                kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                for _ in range(self._count() % 20):
                    k = self.value(kf)
                    if vf.message_type is not None:
                        self.fill(target[k], depth + 1)
                    else:
                        target[k] = self.value(vf)
            elif f.is_repeated:
                target = getattr(msg, f.name)
                n = self._count() if depth < 3 else min(self._count(), 3)
                if f.message_type is not None:
                    for _ in range(min(n, 300) if depth else n):
                        if depth < 4:
                            self.fill(target.add(), depth + 1)
                else:
                    target.extend(self.value(f) for _ in range(n))
            elif f.message_type is not None:
                if depth < 4:
                    sub = getattr(msg, f.name)
                    sub.SetInParent()
                    self.fill(sub, depth + 1)
            else:
                setattr(msg, f.name, self.value(f))
        except (ValueError, TypeError, OverflowError):  # the client library refuses it: skip this field
            pass

    def mutate(self, msg) -> None:
        """Change 1-3 fields somewhere in ``msg`` (in place): a new value, cleared, or appended."""
        for _ in range(self.rng.randint(1, 3)):
            target = msg
            for _depth in range(4):  # walk down into a set sub-message now and then
                subs = [(f, v) for f, v in target.ListFields() if f.message_type is not None
                        and not f.message_type.GetOptions().map_entry]
                if not subs or self.rng.random() < 0.4:
                    break
                f, v = self.rng.choice(subs)
                if f.is_repeated:
                    if not len(v):
                        break
                    target = v[self.rng.randrange(len(v))]
                else:
                    target = v
            fields = target.DESCRIPTOR.fields
            if not fields:
                continue
            f = self.rng.choice(fields)
            if self.rng.random() < 0.2:
                target.ClearField(f.name)
            elif f.is_repeated and not (f.message_type and f.message_type.GetOptions().map_entry) \
                    and f.message_type is None and self.rng.random() < 0.5:
                try:
                    getattr(target, f.name).append(self.value(f))
                except (ValueError, TypeError, OverflowError):
                    pass
            else:
                if f.is_repeated or f.message_type is not None:
                    target.ClearField(f.name)
                self.set_field(target, f, 2)

    def garble(self, data: bytes) -> bytes:
        """Truncate, flip, splice or replace serialized bytes."""
        r = self.rng.random()
        if not data or r < 0.15:
            return self.rng.randbytes(self.rng.choice([1, 2, 5, 64, 1000]))
        b = bytearray(data)
        if r < 0.45:
            return bytes(b[: self.rng.randrange(len(b))])
        if r < 0.75:
            for _ in range(self.rng.randint(1, 4)):
                b[self.rng.randrange(len(b))] = self.rng.randrange(256)
            return bytes(b)
        at = self.rng.randrange(len(b) + 1)
        junk = self.rng.choice([b"\xff" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x80" * 11, self.rng.randbytes(8),
                                b"\x12\x05\xc3\x28abc"])  # bad tags, an overlong varint, bad UTF-8
        return bytes(b[:at] + junk + b[at:])

    def request(self, m: Method) -> tuple[str, list[bytes]]:
        """(kind, serialized request messages: one, or a stream for client streaming)."""
        seeds = self.seeds.get(m.path) or []
        r = self.rng.random()
        kind = "random"
        if seeds and r < 0.08:  # a valid request now and then: state moves on (buffer, train, push, checkpoint)
            seed = self.rng.choice(seeds)
            return "valid", [x.SerializeToString() for x in (seed if m.client_streaming else [seed])]
        if m.client_streaming:
            if seeds and r < 0.6:
                kind, stream = "mutated", [m.cls.FromString(x.SerializeToString()) for x in self.rng.choice(seeds)]
                op = self.rng.random()
                if op < 0.6 and stream:
                    self.mutate(stream[self.rng.randrange(len(stream))])
                elif op < 0.75 and stream:
                    del stream[self.rng.randrange(len(stream))]
                elif op < 0.9 and stream:
                    stream.insert(self.rng.randrange(len(stream) + 1), stream[self.rng.randrange(len(stream))])
                else:
                    self.rng.shuffle(stream)
            else:
                stream = []
                for _ in range(self.rng.choice([0, 0, 1, 2, 5])):
                    msg = m.cls()
                    self.fill(msg)
                    stream.append(msg)
            payload = [x.SerializeToString() for x in stream]
            if payload and self.rng.random() < 0.15:
                i = self.rng.randrange(len(payload))
                payload[i] = self.garble(payload[i])
                kind = "garbled"
            return kind, payload
        msg = m.cls()
        if seeds and r < 0.5:
            kind = "mutated"
            msg.MergeFrom(m.cls.FromString(self.rng.choice(seeds).SerializeToString()))
            self.mutate(msg)
        elif r < 0.85:
            self.fill(msg)
        else:
            kind = "empty"
        data = msg.SerializeToString()
        if self.rng.random() < 0.15:
            kind, data = "garbled", self.garble(data)
        return kind, [data]


def _ident(b):
    return b


@dataclasses.dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    violation: str = ""  # why this answer breaks the goals; "" when it is fine


def call(channel: grpc.Channel, m: Method, payload: list[bytes], timeout_s: float, metadata=None,
         max_responses: int = 100) -> Outcome:
    """Send one request (or stream) as raw bytes; the status and, for a bad one, why."""
    try:
        if m.client_streaming:
            fn = channel.stream_unary(m.path, request_serializer=_ident, response_deserializer=_ident)
            fn(iter(payload), timeout=timeout_s, metadata=metadata)
        elif m.server_streaming:
            fn = channel.unary_stream(m.path, request_serializer=_ident, response_deserializer=_ident)
            it = fn(payload[0], timeout=timeout_s, metadata=metadata)
            for n, _ in enumerate(it):
                if n + 1 >= max_responses:
                    it.cancel()
                    return Outcome(grpc.StatusCode.OK, "")
        else:
            fn = channel.unary_unary(m.path, request_serializer=_ident, response_deserializer=_ident)
            fn(payload[0], timeout=timeout_s, metadata=metadata)
        return Outcome(grpc.StatusCode.OK, "")
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
    why = ""
    if code in BAD_CODES:
        why = f"{code.name}: {details[:300]}"
    elif code == grpc.StatusCode.INVALID_ARGUMENT and not names_its_field(details, m.input):
        why = f"INVALID_ARGUMENT without a field name: {details[:300]}"
    return Outcome(code, details, why)


@dataclasses.dataclass
class Report:
    counts: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(collections.Counter))
    kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    violations: list = dataclasses.field(default_factory=list)
    seconds: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # per method
    requests: int = 0

    def add(self, m: Method, kind: str, out: Outcome, seconds: float = 0.0) -> None:
        self.requests += 1
        self.seconds[m.path] += seconds
        self.kinds[kind] += 1
        self.counts[m.path][out.code.name] += 1
        if out.violation:
            self.violations.append((m.path, kind, out.violation))

    def codes(self) -> collections.Counter:
        total = collections.Counter()
        for c in self.counts.values():
            total.update(c)
        return total


def run(targets: list[tuple[grpc.Channel, list[Method]]], fuzzer: Fuzzer, n_requests: int, *,
        timeout_s: float = 10.0, timeouts: dict[str, float] | None = None, report: Report | None = None,
        on_request=None) -> Report:
    """Send ``n_requests`` requests spread evenly over every method of every target.

    ``timeouts`` overrides ``timeout_s`` per method path (e.g. a short one for a stream that
    stays open, like GetMetrics: its DEADLINE_EXCEEDED is the expected end)."""
    timeouts = timeouts or {}
    report = report or Report()
    plan = [(ch, m) for ch, methods in targets for m in methods]
    for i in range(n_requests):
        ch, m = plan[i % len(plan)]
        kind, payload = fuzzer.request(m)
        t = timeouts.get(m.path, timeout_s)
        t0 = time.perf_counter()
        out = call(ch, m, payload, t)  # GetMetrics waits for new steps: its streams end at the deadline
        report.add(m, kind, out, time.perf_counter() - t0)
        if on_request is not None:
            on_request(i, m, kind, out)
    return report
