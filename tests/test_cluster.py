"""Cluster building and cluster TOML files: the bandwidth matrix, the reference settings, every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from hexgen.coordinator.cluster import GPU, Cluster, ClusterError, HostSpec, build_cluster, load_cluster_toml

CLUSTERS = Path(__file__).resolve().parents[1] / "bench" / "clusters"


def _two_hosts() -> Cluster:
    return build_cluster([HostSpec("a", "H100", 2), HostSpec("b", "L40", 3)], network_gbit_s=10, name="two")


def test_gpus_are_numbered_host_by_host_with_type_figures() -> None:
    c = _two_hosts()
    assert [(g.id, g.host, g.type) for g in c.gpus] == [
        (0, "a", "H100"),
        (1, "a", "H100"),
        (2, "b", "L40"),
        (3, "b", "L40"),
        (4, "b", "L40"),
    ]
    assert (c.gpus[2].memory_gb, c.gpus[2].tflops, c.gpus[2].hbm_gbps) == (48.0, 181.0, 864.0)
    assert c.hosts == {"a": (0, 1), "b": (2, 3, 4)}
    assert len(c) == 5


def test_bandwidth_matrix_intra_and_inter_host() -> None:
    c = _two_hosts()
    assert c.bandwidth[0][0] == 0.0
    assert c.bandwidth[0][1] == 450.0  # NVLink inside the H100 host
    assert c.bandwidth[2][4] == 25.0  # PCIe inside the L40 host
    assert c.bandwidth[1][3] == c.bandwidth[3][1] == 1.25  # 10 Gbit/s = 1.25 GB/s
    assert c.host_bandwidth["a", "a"] == 450.0
    assert c.host_bandwidth["a", "b"] == 1.25


def test_link_override_and_host_overrides() -> None:
    hosts = [
        HostSpec("a", "A100", 2, intra_host_gbps=100.0, memory_gb=40.0, tflops=200.0, hbm_gbps=1555.0),
        HostSpec("b", "A100", 1),
        HostSpec("c", "A100", 1),
    ]
    c = build_cluster(hosts, network_gbit_s=25, links={("a", "b"): 200.0})
    assert c.bandwidth[0][1] == 100.0
    assert (c.gpus[0].memory_gb, c.gpus[0].tflops, c.gpus[0].hbm_gbps) == (40.0, 200.0, 1555.0)
    assert c.gpus[2].memory_gb == 80.0
    assert c.bandwidth[0][2] == c.bandwidth[2][1] == 25.0  # 200 Gbit/s
    assert c.bandwidth[0][3] == c.bandwidth[2][3] == 3.125  # 25 Gbit/s default
    # A host of one GPU has no internal link.
    assert c.host_bandwidth["b", "b"] == 0.0


def test_subset_and_without_renumber() -> None:
    c = _two_hosts()
    sub, remap = c.subset([4, 1])
    assert remap == {1: 0, 4: 1}
    assert [(g.id, g.host) for g in sub.gpus] == [(0, "a"), (1, "b")]
    assert sub.bandwidth == ((0.0, 1.25), (1.25, 0.0))
    rest, remap = c.without([0])
    assert len(rest) == 4 and remap == {1: 0, 2: 1, 3: 2, 4: 3}
    assert rest.bandwidth[1][2] == 25.0


def test_cluster_checks_its_own_shape() -> None:
    gpu = GPU(1, "h", "H100", 80, 989, 3350, 3.69)
    with pytest.raises(ClusterError, match=r"0\.\.n-1"):
        Cluster((gpu,), ((0.0,),))
    with pytest.raises(ClusterError, match="1x1"):
        Cluster((GPU(0, "h", "H100", 80, 989, 3350, 3.69),), ((0.0, 1.0),))


REFERENCE = [
    ("homogeneous", 29.52, {"H100": 8}),  # 8 * 3.69
    ("het-1", 28.69, {"H100": 4, "A100": 7}),  # 14.76 + 13.93
    ("het-2", 28.82, {"A100": 8, "L40": 10}),  # 15.92 + 12.90
    ("het-3", 29.70, {"L40": 12, "A6000": 18}),  # 15.48 + 14.22
    ("het-4", 29.40, {"H100": 2, "A100": 4, "L40": 6, "A6000": 8}),  # 7.38 + 7.96 + 7.74 + 6.32
    ("het-5", 21.26, {"H100": 2, "A100": 2, "L40": 4, "A6000": 6}),  # 7.38 + 3.98 + 5.16 + 4.74
]
# every het setting also comes with 100 Gbit/s NICs; 8 x H100 sit on one host, with no NIC between them
VARIANTS = [(*ref, "") for ref in REFERENCE] + [(*ref, "-100g") for ref in REFERENCE if ref[0] != "homogeneous"]


@pytest.mark.parametrize(("setting", "price", "counts", "variant"), VARIANTS)
def test_reference_settings(setting: str, price: float, counts: dict[str, int], variant: str) -> None:
    c = load_cluster_toml((CLUSTERS / f"{setting}{variant}.toml").read_text())
    assert c.name == setting + variant
    gbit = 100 if variant else 10
    assert c.name == setting + variant
    assert c.price_per_hour == pytest.approx(price, abs=1e-9)
    found: dict[str, int] = {}
    for g in c.gpus:
        found[g.type] = found.get(g.type, 0) + 1
    assert found == counts
    # Hosts hold at most 8 GPUs of one type; hosts meet over the network, each through its NIC.
    for ids in c.hosts.values():
        assert len(ids) <= 8
        assert len({c.gpus[i].type for i in ids}) == 1
    for a in c.hosts:
        for b in c.hosts:
            if a != b:
                assert c.host_bandwidth[a, b] == gbit / 8
        assert (c.nics[a].egress, c.nics[a].ingress) == (gbit / 8, gbit / 8)
    assert f"${price:.2f}/h" in c.describe()


def test_toml_with_every_key() -> None:
    text = """
name = "lab"
network_gbit_s = 40
[[hosts]]
name = "x"
gpu = "a6000"
count = 2
intra_host_gb_s = 12.5
memory_gb = 24
tflops = 100
hbm_gb_s = 500
[[hosts]]
name = "y"
gpu = "L40"
[[links]]
a = "x"
b = "y"
gbit_s = 80
"""
    c = load_cluster_toml(text, name="ignored")
    assert c.name == "lab"
    assert [g.type for g in c.gpus] == ["A6000", "A6000", "L40"]  # count defaults to 1
    assert (c.gpus[0].memory_gb, c.gpus[0].tflops, c.gpus[0].hbm_gbps) == (24.0, 100.0, 500.0)
    assert c.bandwidth[0][1] == 12.5
    assert c.bandwidth[0][2] == 10.0  # the 80 Gbit/s link, not the 40 Gbit/s network


def test_toml_name_defaults_to_the_argument() -> None:
    c = load_cluster_toml('[[hosts]]\ngpu = "H100"\n', name="from-file")
    assert c.name == "from-file"
    assert c.hosts == {"host0": (0,)}


HOST = '[[hosts]]\nname = "a"\ngpu = "H100"\ncount = 2\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name = 'x'\n[[hosts]\n", "malformed TOML"),
        ("colour = 'blue'\n" + HOST, "unknown key.*colour"),
        (HOST + "speed = 3\n", r"hosts\[0\]: unknown key.*speed"),
        ('[[hosts]]\nname = "a"\ngpu = "V100"\n', "host 'a': unknown GPU type 'V100'"),
        ('[[hosts]]\nname = "a"\ncount = 2\n', r"hosts\[0\]: gpu must be a GPU type name"),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = 0\n', "count must be at least 1"),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = -3\n', "count must be at least 1"),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = "2"\n', "count must be an integer"),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = 2.5\n', "count must be an integer"),
        ('[[hosts]]\nname = "a"\ngpu = "H100"\ncount = true\n', "count must be an integer"),
        (HOST + HOST, "host 'a' is listed twice"),
        (HOST + '[[links]]\na = "a"\nb = "z"\ngbit_s = 5\n', "link names unknown host 'z'"),
        (HOST + '[[links]]\na = "a"\nb = "a"\n', r"links\[0\] needs a, b"),
        (
            HOST + '[[hosts]]\nname = "b"\ngpu = "L40"\n[[links]]\na = "a"\nb = "b"\ngbit_s = 0\n',
            "gbit_s must be a positive number",
        ),
        (HOST + 'tflops = "fast"\n', "tflops must be a positive number"),
        ("network_gbit_s = 0\n" + HOST, "network_gbit_s must be a positive number"),
        ("network_gbit_s = 'fast'\n" + HOST, "network_gbit_s must be a positive number"),
        (HOST + "tflops = -5\n", "tflops must be a positive number"),
        (HOST + "memory_gb = 0\n", "memory_gb must be a positive number"),
        ("links = 5\n" + HOST, "links must be a"),
        ("name = 'empty'\n", r"non-empty \[\[hosts\]\]"),
        ("hosts = []\n", r"non-empty \[\[hosts\]\]"),
        ("hosts = [1]\n", r"hosts\[0\] must be a table"),
    ],
)
def test_toml_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ClusterError, match=message):
        load_cluster_toml(text)


def test_build_cluster_needs_gpus() -> None:
    with pytest.raises(ClusterError, match="no GPUs"):
        build_cluster([])


def test_nics_default_to_the_network_rate_and_cap_links() -> None:
    text = """
    network_gbit_s = 10
    nic_gbit_s = 25
    [[hosts]]
    name = "a"
    gpu = "H100"
    count = 2
    nic_gbit_s = 100
    [[hosts]]
    name = "b"
    gpu = "L40"
    nic_in_gbit_s = 40
    [[hosts]]
    name = "c"
    gpu = "L40"
    [[links]]
    a = "a"
    b = "b"
    gbit_s = 400
    """
    c = load_cluster_toml(text)
    assert (c.nics["a"].egress, c.nics["a"].ingress) == (12.5, 12.5)
    assert (c.nics["b"].egress, c.nics["b"].ingress) == (25 / 8, 5.0)
    assert (c.nics["c"].egress, c.nics["c"].ingress) == (25 / 8, 25 / 8)
    # a 400 Gbit/s link still ends at b's NIC: 40 Gbit/s in, 25 out
    assert c.host_bandwidth["a", "b"] == 5.0
    assert c.host_bandwidth["b", "a"] == 25 / 8
    assert c.host_bandwidth["a", "c"] == 1.25  # the 10 Gbit/s network between them
    assert c.host_bandwidth["a", "a"] == 450.0  # NVLink is not NIC-bound
    assert c.link(0, 2) == 25 / 8  # a GPU pair across hosts: the slower direction's NIC
    assert "25-100 Gbit/s NICs" in c.describe()
    assert c.subset([0, 1])[0].nics == {"a": c.nics["a"]}


def test_nic_rate_errors() -> None:
    with pytest.raises(ClusterError, match=r"hosts\[0\]: nic_gbit_s must be a positive number"):
        load_cluster_toml('[[hosts]]\ngpu = "H100"\nnic_gbit_s = 0')
    with pytest.raises(ClusterError, match="cluster: nic_gbit_s must be a positive number"):
        load_cluster_toml('nic_gbit_s = -1\n[[hosts]]\ngpu = "H100"')
