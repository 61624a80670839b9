"""IR -> iptables-restore text, in kube-proxy's layout with lbc's own chain names.

Pure: no kernel, no files. One restore document per address family, each with a
`filter` table (REJECT/DROP for frontends without usable backends, forwarding
accept) and a `nat` table (dispatch, per-pool chains, per-endpoint DNAT chains,
masquerade). Rules that hook lbc's chains into the built-in chains are part of the
document so it loads as-is in an empty namespace; the apply engine inserts those
idempotently instead of restoring them.

The frontend rules of `LBC-SERVICES` (both tables) and `LBC-NODEPORTS` go through
`dispatch.build`: a few of them stay a flat list, as in kube-proxy; many become a tree
of `LBC-DSP-` chains keyed by destination, so a new connection walks a bounded number
of rules whatever the number of services. `render_family(..., split_above=None)`
gives the flat layout at any size (the benchmarks' kube-proxy baseline).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from lbc.backends.iptables import names as n
from lbc.backends.iptables.dispatch import SPLIT_ABOVE, Entry, KeySpace, address_text, build
from lbc.ir.names import digest, hostport
from lbc.ir.nodes import Empty, Frontend, Kind, Masquerade, Pool, Program, Proto

STATISTIC_STEPS = 1 << 31  # the kernel's resolution of `-m statistic --probability`
# Above this many endpoints, a cluster is large: the rules of each endpoint (in its
# pool's chain and its own) carry no comment, as in kube-proxy's "large cluster mode" at
# the same number (they are most of the ruleset, and their comments a third of its
# bytes), and a pool of one endpoint without affinity holds that endpoint's two rules
# itself instead of jumping to an endpoint chain (`FamilyRenderer.pool_chain`).
LARGE_CLUSTER_ENDPOINTS = 1000
_KIND_LABEL = {
    Kind.CLUSTER_IP: "cluster IP",
    Kind.EXTERNAL_IP: "external IP",
    Kind.LOAD_BALANCER: "load-balancer IP",
    Kind.NODE_PORT: "node port",
}
BUILTIN_HOOKS = {
    "filter": (
        (
            "INPUT",
            f'-m conntrack --ctstate NEW -m comment --comment "{n.PORTALS_COMMENT}" '
            f"-j {n.SERVICES}",
        ),
        (
            "FORWARD",
            f'-m conntrack --ctstate NEW -m comment --comment "{n.PORTALS_COMMENT}" '
            f"-j {n.SERVICES}",
        ),
        (
            "OUTPUT",
            f'-m conntrack --ctstate NEW -m comment --comment "{n.PORTALS_COMMENT}" '
            f"-j {n.SERVICES}",
        ),
        ("FORWARD", f'-m comment --comment "lbc forwarding rules" -j {n.FORWARD}'),
    ),
    "nat": (
        ("PREROUTING", f'-m comment --comment "{n.PORTALS_COMMENT}" -j {n.SERVICES}'),
        ("OUTPUT", f'-m comment --comment "{n.PORTALS_COMMENT}" -j {n.SERVICES}'),
        ("POSTROUTING", f'-m comment --comment "lbc postrouting rules" -j {n.POSTROUTING}'),
    ),
}


@dataclass
class _Table:
    """One table: lbc's chains (declared, in order) and the rules of every chain.

    A chain's rules are its `-A` lines: a list while rules are added, or a tuple of
    lines already joined (an endpoint chain's, made whole at once: a tuple of strings
    is one object the garbage collector soon stops tracking).
    """

    name: str
    chains: dict[str, list[str] | tuple[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)

    def declare(self, chain: str) -> bool:
        """Declare `chain`; False if it already was (shared endpoint chains)."""
        if chain in self.chains:
            return False
        self.chains[chain] = []
        return True

    def add(self, chain: str, rule: str) -> None:
        rules = self.chains.get(chain)
        if rules is not None:
            assert isinstance(rules, list), f"{chain} is already complete"
            rules.append(f"-A {chain} {rule}")
        else:  # a built-in chain
            self.hooks.append(f"-A {chain} {rule}")

    def objects(self, family: int) -> dict[str, tuple[str, ...]]:
        """The table's chains and hook jumps as the apply engine's state objects: what
        `kernel.parse` reads from the printed table, without printing and reading it."""
        prefix = f"ipv{family} {self.name} "
        out = {
            prefix + chain: tuple(rules) if type(rules) is list else tuple(rules[0].split("\n"))
            for chain, rules in self.chains.items()
        }
        jumps: dict[str, list[str]] = {}
        for line in self.hooks:
            if f" -j {n.PREFIX}" not in line:
                continue  # not a jump into lbc's chains: not lbc's to keep
            chain = line[3 : line.index(" ", 3)]
            jumps.setdefault(f"{prefix}{chain} jumps", []).append(line)
        out.update((k, tuple(sorted(v))) for k, v in jumps.items())
        return out

    def lines(self) -> list[str]:
        out = [f"*{self.name}", *(f":{c} - [0:0]" for c in self.chains), *self.hooks]
        for rules in self.chains.values():
            out += rules
        out.append("COMMIT")
        return out


def comment(text: str) -> str:
    """A `-m comment` match; quotes and backslashes are escaped for iptables-restore."""
    return f'-m comment --comment "{_escape(text)}"'


def _escape(text: str) -> str:
    """`text` as it goes between the quotes of a comment."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def saved(text: str) -> str:
    """An address or network (`ip/len`) as iptables-save prints it back.

    Python writes an IPv6 address whose first 96 bits are zero in hex (`::a00:1`);
    iptables-save, through glibc's inet_ntop, with a dotted IPv4 tail (`::10.0.0.1`).
    """
    if not text.startswith("::"):
        return text  # every other address prints as lowering wrote it
    address, slash, length = text.partition("/")
    return address_text(6, int(ipaddress.IPv6Address(address))) + slash + length


def source(cidr: str) -> str:
    """`-s CIDR ` for a source range, nothing for one of every address (`0.0.0.0/0`,
    `::/0`), which iptables drops from the rule: it would never read back."""
    return "" if cidr.endswith("/0") else f"-s {saved(cidr)} "


def probabilities(weights: Sequence[int]) -> list[str]:
    """The `--probability` of every rule but the last, exactly as the kernel keeps them.

    xt_statistic stores a probability in steps of 2**-31 and iptables-save prints it
    with 11 decimals, so each value is rounded to a step and printed that way (a
    read-back then equals the rendered rule). Each rule is chosen so that the rules
    so far claim, after their rounding, the total share of their endpoints; rounding
    errors therefore never add up: every share is within 2**-31 of weight/total.
    """
    total = sum(weights)
    claimed = 0.0  # the share all earlier rules take together, rounding included
    cumulative = 0
    out = []
    for weight in weights[:-1]:
        cumulative += weight
        want = (cumulative / total - claimed) / (1 - claimed)
        steps = min(STATISTIC_STEPS, max(0, round(want * STATISTIC_STEPS)))
        chance = steps / STATISTIC_STEPS
        out.append(f"{chance:.11f}")
        claimed += (1 - claimed) * chance
    return out


def endpoint_count(program: Program) -> int:
    """How many endpoints the program's pools use (one per active backend id)."""
    return len({b.key for pool in program.pools for b in pool.active})


def is_large(program: Program) -> bool:
    """Whether the program is rendered as a large cluster (`LARGE_CLUSTER_ENDPOINTS`)."""
    return endpoint_count(program) > LARGE_CLUSTER_ENDPOINTS


def render_family(program: Program, family: int, split_above: int | None = SPLIT_ABOVE) -> str:
    """The iptables-restore document for one family (4 or 6).

    `split_above`: the most frontend rules a dispatch chain holds before it is split
    into a tree (None: never, kube-proxy's linear chains).
    """
    return FamilyRenderer(program, family, split_above, is_large(program)).render()


class Documents(Mapping[int, str]):
    """The restore document of each family, printed when first asked for, with the
    state objects they hold (`objects`: what `kernel.parse` of the documents gives,
    made from the rendered chains when first asked for, not by reading the text).

    Compiling asks only for `lines` (the artifact's text); an apply asks for the
    objects, and a restore of a whole family for its document.
    """

    def __init__(self, renderers: Sequence[FamilyRenderer]) -> None:
        self._renderers = {r.family: r for r in renderers}
        self._documents: dict[int, str] = {}
        self._objects: dict[str, tuple[str, ...]] | None = None

    def __getitem__(self, family: int) -> str:
        if family not in self._documents:
            self._documents[family] = self._renderers[family].text()
        return self._documents[family]

    def __iter__(self) -> Iterator[int]:
        return iter(self._renderers)

    def __len__(self) -> int:
        return len(self._renderers)

    def lines(self, family: int) -> list[str]:
        """The document of `family` as lines, without its final newline."""
        return self._renderers[family].lines()

    @property
    def objects(self) -> dict[str, tuple[str, ...]]:
        if self._objects is None:
            objects: dict[str, tuple[str, ...]] = {}
            for family, renderer in self._renderers.items():
                objects.update(renderer.filter.objects(family))
                objects.update(renderer.nat.objects(family))
            self._objects = objects
        return self._objects


def render_documents(program: Program) -> Documents:
    """Every family's restore document and, alongside, their state objects."""
    renderers = []
    large = is_large(program)
    for family in program.families():
        renderer = FamilyRenderer(program, family, SPLIT_ABOVE, large)
        renderer.build()
        renderers.append(renderer)
    return Documents(renderers)


class FamilyRenderer:
    """The chains of one family. `large`: the large-cluster form, endpoint rules without
    comments and pools of one endpoint without an endpoint chain (`is_large` of the
    whole program, which a renderer of a single service cannot tell)."""

    def __init__(self, program: Program, family: int, split_above: int | None, large: bool) -> None:
        self.program = program
        self.large = large
        self.family = family
        self.split_above = split_above
        bits = 32 if family == 4 else 128
        self.by_address = KeySpace(family, bits)
        self.by_port = KeySpace(family, 0)
        # Frontend rules of the dispatch chains, gathered first and placed by `dispatch.build`.
        self.nat_services: list[Entry] = []
        self.nat_nodeports: list[Entry] = []
        self.filter_services: list[Entry] = []
        self.node = program.node
        self.host = "/32" if family == 4 else "/128"
        self.reject = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
        pod_cidr = program.node.pod_cidr(family)
        self.pod_cidr = saved(pod_cidr) if pod_cidr else pod_cidr
        self.pools = program.pool_index()
        self.filter = _Table("filter")
        self.nat = _Table("nat")
        self.probabilities: dict[tuple[int, ...], list[str]] = {}

    # --- whole document -----------------------------------------------------------
    def render(self) -> str:
        self.build()
        return self.text()

    def text(self) -> str:
        return "\n".join([*self.lines(), ""])  # the final newline without a copy

    def lines(self) -> list[str]:
        return [*self.filter.lines(), *self.nat.lines()]

    def build(self) -> None:
        frontends = self.frontends()
        for f in frontends:
            self.dispatch(f)
        node_addresses = sorted({f.address for f in frontends if f.kind is Kind.NODE_PORT})
        self.shared(self.program.reject_unknown, node_addresses)
        self.own(frontends)

    def localnet_firewall(self) -> None:
        """Drop what reaches 127.0.0.0/8 from elsewhere unless it is node-port traffic.

        Node ports on 127.0.0.1 need `route_localnet`, which also lets the neighbours
        of the node reach whatever listens on its loopback addresses (CVE-2020-8558).
        kube-proxy guards against it with this same rule: a packet to 127.0.0.0/8 from
        a source outside it is dropped unless it belongs to a connection already
        accepted or was translated (DNAT: a node port).
        """
        self.filter.declare(n.FIREWALL)
        for hook in ("INPUT", "OUTPUT"):
            self.filter.add(hook, f"{comment('lbc localnet firewall')} -j {n.FIREWALL}")
        self.filter.add(
            n.FIREWALL,
            f"! -s 127.0.0.0/8 -d 127.0.0.0/8 {comment('lbc: block incoming localnet connections')}"
            " -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        )

    def frontends(self) -> list[Frontend]:
        return [f for f in self.program.frontends if f.family == self.family]

    def shared(self, cluster_ips: Sequence[str], node_addresses: Sequence[str]) -> None:
        """The chains every service shares: the dispatch trees of the gathered frontend
        rules, the catch-all for `cluster_ips`, the node-port entry for `node_addresses`,
        the fixed chains and the jumps from the built-in chains."""
        mark = f"{self.node.masquerade_mark:#x}"
        # Chains are printed in the order they are declared: the dispatch trees follow
        # their roots, before the fixed chains and the per-service chains.
        self.filter.declare(n.SERVICES)
        self.place(self.filter, n.SERVICES, self.filter_services, self.by_address)
        # Then what is left for a cluster IP: a port or protocol no service uses there.
        unknown = comment("lbc: no service uses this port of the cluster IP")
        catch_all = [
            Entry(
                self.by_address.key(address, Proto.TCP, 0),
                f"-d {saved(address)}{self.host} {unknown} -j REJECT --reject-with {self.reject}",
            )
            for address in cluster_ips
            if (":" in address) == (self.family == 6)
        ]
        if catch_all:
            self.filter.declare(n.CLUSTER_IPS)
            self.filter.add(n.SERVICES, f"-j {n.CLUSTER_IPS}")
            self.place(self.filter, n.CLUSTER_IPS, catch_all, self.by_address)
        self.filter.declare(n.FORWARD)
        for hook, rule in BUILTIN_HOOKS["filter"]:
            self.filter.add(hook, rule)
        if self.family == 4 and self.node.localhost_node_ports:
            self.localnet_firewall()
        fwd = comment("lbc forwarding rules")
        self.filter.add(n.FORWARD, "-m conntrack --ctstate INVALID -j DROP")
        self.filter.add(n.FORWARD, f"{fwd} -m mark --mark {mark}/{mark} -j ACCEPT")
        self.filter.add(n.FORWARD, f"{fwd} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")

        for chain in (n.SERVICES, n.NODEPORTS):
            self.nat.declare(chain)
        self.place(self.nat, n.SERVICES, self.nat_services, self.by_address)
        # After the tree: a packet for a node address that no frontend rule took.
        for address in node_addresses:
            self.nat.add(
                n.SERVICES,
                f"-d {saved(address)}{self.host} {comment('lbc service nodeports')} "
                f"-j {n.NODEPORTS}",
            )
        self.place(self.nat, n.NODEPORTS, self.nat_nodeports, self.by_port)
        for chain in (n.POSTROUTING, n.MARK_MASQ):
            self.nat.declare(chain)
        for hook, rule in BUILTIN_HOOKS["nat"]:
            self.nat.add(hook, rule)
        self.nat.add(n.MARK_MASQ, f"-j MARK --set-xmark {mark}/{mark}")  # i.e. --or-mark
        self.nat.add(n.POSTROUTING, f"-m mark ! --mark {mark}/{mark} -j RETURN")
        self.nat.add(n.POSTROUTING, f"-j MARK --set-xmark {mark}/0x0")  # i.e. --xor-mark
        self.nat.add(
            n.POSTROUTING,
            f"{comment('lbc service traffic requiring SNAT')} -j MASQUERADE --random-fully",
        )

    def own(self, frontends: list[Frontend]) -> None:
        """The chains of single services: pools, endpoints, external and firewall."""
        cluster_ips: dict[str, list[Frontend]] = {}
        for f in frontends:
            if f.kind is Kind.CLUSTER_IP:
                cluster_ips.setdefault(f.pool, []).append(f)
        for pool in self.program.pools:
            if pool.family == self.family:
                self.pool_chain(pool, cluster_ips.get(pool.id, []))
        for f in frontends:
            self.external_chains(f)

    def place(self, table: _Table, root: str, entries: list[Entry], space: KeySpace) -> None:
        """Put a root chain's frontend rules in it, or in a tree of dispatch chains under it."""
        label = f"ipv{self.family} {table.name} {root}"
        tree = build(entries, space, label, self.split_above)
        for chain, rules in tree.chains.items():
            table.declare(chain)
            for rule in rules:
                table.add(chain, rule)
        for rule in tree.rules:
            table.add(root, rule)

    # --- frontends ------------------------------------------------------------------
    def match(self, f: Frontend, note: str) -> str:
        """`-d VIP -p tcp <note> -m tcp --dport N`, in the order iptables-save prints it."""
        return f"-d {saved(f.address)}{self.host} -p {f.proto} {note} -m {f.proto} --dport {f.port}"

    def label(self, f: Frontend) -> str:
        return f"{f.service} {_KIND_LABEL[f.kind]}"

    def target(self, f: Frontend) -> str | None:
        """The nat chain a frontend's packets jump to, or None when nothing can serve them."""
        pool = self.pools[f.pool]
        if f.kind is Kind.CLUSTER_IP:
            return self.pool_name(pool) if pool.active else None
        if not pool.active and f.internal_pool is None:
            return None
        chain = self.ext_name(f)
        return self.fw_name(f) if f.source_ranges else chain

    def dispatch(self, f: Frontend) -> None:
        """Gather the frontend's rules for the dispatch chains of both tables."""
        pool = self.pools[f.pool]
        what = comment(self.label(f))
        jump = self.target(f)
        by_address = self.by_address.key(f.address, f.proto, f.port)
        if jump is not None:
            rule = f"{self.match(f, what)} -j {jump}"
            if f.kind is Kind.NODE_PORT:
                # Every node address has the same node ports: they are keyed by port.
                self.nat_nodeports.append(Entry(self.by_port.key(None, f.proto, f.port), rule))
            else:
                self.nat_services.append(Entry(by_address, rule))
        # Only packets that nothing DNATed still carry the frontend's address here.
        if not pool.active:
            verdict = (
                f"-j REJECT --reject-with {self.reject}"
                if pool.when_empty is Empty.REJECT
                else "-j DROP"
            )
            reason = "has no local endpoints" if pool.local_only else "has no endpoints"
            note = comment(f"{f.service} {reason}")
            # With source ranges, only allowed sources learn that there is no endpoint.
            for cidr in f.source_ranges or ("",):
                rule = f"{source(cidr) if cidr else ''}{self.match(f, note)} {verdict}"
                self.filter_services.append(Entry(by_address, rule))
        if f.source_ranges:
            note = comment(f"{f.service} traffic not accepted by {self.fw_name(f)}")
            self.filter_services.append(Entry(by_address, f"{self.match(f, note)} -j DROP"))

    # --- per-pool and per-endpoint chains ------------------------------------------
    def pool_name(self, pool: Pool) -> str:
        return (n.SVL if pool.local_only else n.SVC) + pool.id

    def ext_name(self, f: Frontend) -> str:
        return n.EXT + digest(f"{f.pool}/{f.masquerade}/{f.internal_pool}")

    def fw_name(self, f: Frontend) -> str:
        return n.FW + digest(f"{f.service}/{f.proto}/{f.address}/{f.port}/firewall")

    def pool_chain(self, pool: Pool, cluster_ips: list[Frontend]) -> None:
        """The pool's chain and its endpoints' chains; `cluster_ips` are the pool's frontends."""
        active = pool.active
        if not active:
            return
        name = self.pool_name(pool)
        nat = self.nat
        nat.declare(name)
        for f in cluster_ips:
            self.cluster_masquerade(name, f)
        rules = nat.chains[name]
        assert isinstance(rules, list)
        what = _escape(pool.service)
        large = self.large
        # Each endpoint's `ip:port`, its chain, and what its rules in the pool's chain
        # start with: a comment naming the pool's service and the endpoint (none for a
        # large cluster).
        to = f"-A {name}" if large else f'-A {name} -m comment --comment "{what} -> '
        ends = []
        for b in active:
            where = hostport(saved(b.address), b.port)
            ends.append((b, n.SEP + b.id, where, to if large else f'{to}{where}"'))
        timeout = pool.affinity_timeout
        proto, host = pool.proto, self.host
        note = "" if large else f' -m comment --comment "{what}"'
        if timeout is None:
            match = f" -m {proto}"
        else:  # the DNAT remembers the client for this endpoint (`{sep}`: its chain)
            match = f" -m recent --set --name {{sep}} --mask {self.mask()} --rsource -m {proto}"

        def endpoint_rules(chain: str, address: str, where: str) -> str:
            """An endpoint's hairpin mark and DNAT as rules of `chain`, joined."""
            dnat = match if timeout is None else match.format(sep=chain)
            return (
                f"-A {chain} -s {saved(address)}{host}{note} -j {n.MARK_MASQ}\n"
                f"-A {chain} -p {proto}{note}{dnat} -j DNAT --to-destination {where}"
            )

        if large and timeout is None and len(ends) == 1:
            # The endpoint chain's two rules, in the pool's chain: the same packets take
            # the same path, with one chain and one jump fewer to load (a cluster of
            # 30,000 one-endpoint services loads in two thirds of the time).
            b, _, where, _ = ends[0]
            rules += endpoint_rules(name, b.address, where).split("\n")
            return
        if timeout is not None:
            recent = f" -m recent --rcheck --seconds {timeout} --reap --name "
            rsource = f" --mask {self.mask()} --rsource -j "
            rules += [f"{start}{recent}{sep}{rsource}{sep}" for _, sep, _, start in ends]
        chances = self.chances(tuple([b.weight for b in active]))
        statistic = " -m statistic --mode random --probability "
        rules += [
            f"{start}{statistic}{chance} -j {sep}"
            for (_, sep, _, start), chance in zip(ends, chances, strict=False)
        ]
        rules += [f"{start} -j {sep}" for _, sep, _, start in ends[len(chances) :]]
        chains = nat.chains
        for b, sep, where, _ in ends:
            if sep not in chains:  # else the same endpoint in a cluster and a local pool
                chains[sep] = (endpoint_rules(sep, b.address, where),)

    def chances(self, weights: tuple[int, ...]) -> list[str]:
        """`probabilities(weights)`, made once for each list of weights."""
        found = self.probabilities.get(weights)
        if found is None:
            found = self.probabilities[weights] = probabilities(weights)
        return found

    def mask(self) -> str:
        return "255.255.255.255" if self.family == 4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

    def cluster_masquerade(self, chain: str, f: Frontend) -> None:
        what = comment(f"{f.service} cluster IP")
        if f.masquerade is Masquerade.ALWAYS:
            self.nat.add(chain, f"{self.match(f, what)} -j {n.MARK_MASQ}")
        elif f.masquerade is Masquerade.OFF_CLUSTER and self.pod_cidr:
            self.nat.add(chain, f"! -s {self.pod_cidr} {self.match(f, what)} -j {n.MARK_MASQ}")

    def external_chains(self, f: Frontend) -> None:
        if f.kind is Kind.CLUSTER_IP or self.target(f) is None:
            return
        pool = self.pools[f.pool]
        ext = self.ext_name(f)
        if f.source_ranges:
            fw = self.fw_name(f)
            if self.nat.declare(fw):
                for cidr in f.source_ranges:
                    self.nat.add(
                        fw, f"{source(cidr)}{comment(f'{f.service} loadbalancer IP')} -j {ext}"
                    )
        if not self.nat.declare(ext):
            return
        what = f.service
        if f.internal_pool is not None:
            internal = self.pools[f.internal_pool]
            if internal.active:
                to_internal = self.pool_name(internal)
                if self.pod_cidr:
                    self.nat.add(
                        ext,
                        f"-s {self.pod_cidr} "
                        f"{comment(f'pod traffic for {what} external destinations')} "
                        f"-j {to_internal}",
                    )
                local = comment(f"masquerade LOCAL traffic for {what} external destinations")
                self.nat.add(ext, f"{local} -m addrtype --src-type LOCAL -j {n.MARK_MASQ}")
                route = comment(f"route LOCAL traffic for {what} external destinations")
                self.nat.add(ext, f"{route} -m addrtype --src-type LOCAL -j {to_internal}")
        elif f.masquerade is Masquerade.ALWAYS:
            self.nat.add(
                ext,
                f"{comment(f'masquerade traffic for {what} external destinations')} "
                f"-j {n.MARK_MASQ}",
            )
        elif f.masquerade is Masquerade.OFF_CLUSTER and self.pod_cidr:
            self.nat.add(
                ext,
                f"! -s {self.pod_cidr} "
                f"{comment(f'masquerade off-cluster traffic for {what} external destinations')} "
                f"-j {n.MARK_MASQ}",
            )
        if pool.active:
            self.nat.add(ext, f"-j {self.pool_name(pool)}")
