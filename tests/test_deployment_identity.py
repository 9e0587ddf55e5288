"""Node-key bindings in a real store, node admission, client-side residual files and deployment credentials."""

import datetime
import ipaddress

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from sift_fl.codec import encode_residual
from sift_fl.deployment.client_state import ClientState, ModelBinding, residual_digest
from sift_fl.deployment.credentials import write_certificates, write_node_key
from sift_fl.deployment.node_identity import NodeRegistry, key_sha256
from sift_fl.layout import ParameterLayout, TensorSpec
from sift_fl.sign import SignVector
from sift_fl.store import MergeStore, NodeKeyMismatchError, StoreIdentity, Upload, content_digest

LAYOUT = ParameterLayout((TensorSpec("w", (12, 5), "float32"), TensorSpec("b", (7,), "float32")))
SEED = 5
BASE = "c" * 64
SIGNS = SignVector(SEED, LAYOUT)
KEY_A = key_sha256(b"node key a")
KEY_B = key_sha256(b"node key b")


def residual(seed: int):
    generator = np.random.default_rng(seed)
    dense = {}
    for spec in LAYOUT.tensors:
        magnitude = generator.uniform(1e-3, 0.5, spec.numel).astype(np.float32)
        keep = generator.random(spec.numel) < 0.5
        dense[spec.name] = (np.where(keep, magnitude, 0) * SIGNS.signs(spec.name)).astype(np.float32).reshape(spec.shape)
    return encode_residual(dense, LAYOUT, SIGNS)


def store_with(directory, clients=()) -> MergeStore:
    store = MergeStore.create(directory, StoreIdentity(LAYOUT, BASE, SEED))
    for index, client_id in enumerate(clients):
        store.join(Upload(client_id, residual(index).to_arrays(), LAYOUT.digest(), BASE, SEED))
    return store


def binding(client_id: str = "0") -> ModelBinding:
    return ModelBinding(client_id, LAYOUT.digest(), BASE, SEED)


def test_bind_node_key_new(tmp_path):
    store = store_with(tmp_path)

    assert store.bind_node_key("0", KEY_A) is True
    assert store.node_keys() == {"0": KEY_A}


def test_bind_node_key_repeat_is_noop(tmp_path):
    store = store_with(tmp_path)
    store.bind_node_key("0", KEY_A)

    assert store.bind_node_key("0", KEY_A) is False


def test_bind_node_key_other_key_rejected(tmp_path):
    store = store_with(tmp_path, ["0"])
    store.bind_node_key("0", KEY_A)
    before = (content_digest(store), store.generation, store.node_keys())

    with pytest.raises(NodeKeyMismatchError, match="bound to node key"):
        store.bind_node_key("0", KEY_B)

    assert (content_digest(store), store.generation, store.node_keys()) == before


def test_bind_node_key_reused_for_other_client_rejected(tmp_path):
    store = store_with(tmp_path)
    store.bind_node_key("0", KEY_A)

    with pytest.raises(NodeKeyMismatchError, match="bound to client '0'"):
        store.bind_node_key("1", KEY_A)


def test_bind_node_key_invalid_digest(tmp_path):
    store = store_with(tmp_path)

    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.bind_node_key("0", "not-a-digest")


def test_node_keys_survive_reopen_and_withdrawal(tmp_path):
    store = store_with(tmp_path, ["0"])
    store.bind_node_key("0", KEY_A)
    store.withdraw("0")
    store.close()

    with MergeStore.open(tmp_path) as reopened:
        assert reopened.node_keys() == {"0": KEY_A}


def test_node_keys_empty_without_table(tmp_path):
    store = store_with(tmp_path, ["0"])

    assert store.node_keys() == {}


def registry(store: MergeStore, keys: dict[int, str]) -> NodeRegistry:
    nodes = NodeRegistry(store, bind_node_keys=True)
    nodes.keys.update(keys)
    return nodes


def test_admit_rejects_other_clients_key(tmp_path):
    store = store_with(tmp_path, ["0"])
    store.bind_node_key("0", KEY_A)
    nodes = registry(store, {1: KEY_A, 2: KEY_B})

    reason = nodes.admit(2, "0")

    assert "bound to node key" in reason
    assert nodes.client_of(2) is None
    assert [r.client for r in nodes.rejections] == ["0"]


def test_admit_accepts_bound_key(tmp_path):
    store = store_with(tmp_path, ["0"])
    store.bind_node_key("0", KEY_A)
    nodes = registry(store, {1: KEY_A})

    assert nodes.admit(1, "0") is None
    assert nodes.client_of(1) == "0"


def test_admit_accepts_new_client(tmp_path):
    nodes = registry(store_with(tmp_path), {1: KEY_A})

    assert nodes.admit(1, "7") is None


def test_admit_rejects_node_without_key(tmp_path):
    nodes = registry(store_with(tmp_path), {})

    assert "no public key" in nodes.admit(1, "7")


def test_admit_rejects_unbound_merged_client(tmp_path):
    nodes = registry(store_with(tmp_path, ["0"]), {1: KEY_A})

    assert "without a node-key binding" in nodes.admit(1, "0")


def test_admit_rejects_duplicate_claim(tmp_path):
    nodes = NodeRegistry(store_with(tmp_path), bind_node_keys=False)
    nodes.admit(1, "3")

    assert "already reported" in nodes.admit(2, "3")


def test_admit_rejects_invalid_client_id(tmp_path):
    nodes = NodeRegistry(store_with(tmp_path), bind_node_keys=False)

    assert "control characters" in nodes.admit(1, "bad\nid")


def test_check_reply_other_client(tmp_path):
    nodes = registry(store_with(tmp_path), {1: KEY_A})
    nodes.admit(1, "4")

    assert "names client '5'" in nodes.check_reply(1, "5")


def test_bind_before_join_records_key(tmp_path):
    store = store_with(tmp_path)
    nodes = registry(store, {1: KEY_A})
    nodes.admit(1, "4")

    nodes.bind_before_join(1, "4")

    assert store.node_keys() == {"4": KEY_A}


def test_client_state_round_trip(tmp_path):
    state = ClientState(tmp_path / "site")
    encoded = residual(3)

    digest = state.save(binding(), encoded)
    loaded = state.load(binding(), LAYOUT)

    assert digest == residual_digest(encoded.to_arrays())
    assert residual_digest(loaded.to_arrays()) == digest


def test_client_state_missing_file(tmp_path):
    assert ClientState(tmp_path / "empty").load(binding(), LAYOUT) is None


def test_client_state_other_model_ignored(tmp_path):
    state = ClientState(tmp_path)
    state.save(binding(), residual(3))

    assert state.load(ModelBinding("0", LAYOUT.digest(), "d" * 64, SEED), LAYOUT) is None


def test_client_state_other_client_ignored(tmp_path):
    state = ClientState(tmp_path)
    state.save(binding("0"), residual(3))

    assert state.load(binding("1"), LAYOUT) is None


def test_client_state_tampered_file_ignored(tmp_path):
    state = ClientState(tmp_path)
    state.save(binding(), residual(3))
    data = bytearray(state.path.read_bytes())
    data[-1] ^= 0xFF
    state.path.write_bytes(bytes(data))

    assert state.load(binding(), LAYOUT) is None


def test_client_state_relative_dir_rejected():
    with pytest.raises(ValueError, match="absolute path"):
        ClientState.from_node_config({"state-dir": "relative/state"})


def test_client_state_absent_key():
    assert ClientState.from_node_config({"client-id": "0"}) is None


def test_residual_digest_matches_store(tmp_path):
    store = store_with(tmp_path, ["0"])

    assert residual_digest(store.load_residual("0").to_arrays()) == residual_digest(residual(0).to_arrays())


def test_certificate_names_hosts(tmp_path):
    paths = write_certificates(tmp_path, ["127.0.0.1", "localhost"])
    certificate = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]


def test_certificate_signed_by_ca(tmp_path):
    paths = write_certificates(tmp_path, ["127.0.0.1"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.pem"].read_bytes())

    server.verify_directly_issued_by(ca)
    assert server.not_valid_after_utc > datetime.datetime.now(datetime.timezone.utc)


def test_private_keys_owner_only(tmp_path):
    paths = write_certificates(tmp_path, ["127.0.0.1"])
    private, _ = write_node_key(tmp_path / "site-0")

    assert [p.stat().st_mode & 0o077 for p in (paths["ca.key"], paths["server.key"], private)] == [0, 0, 0]


def test_node_key_accepted_by_flower(tmp_path):
    private, public = write_node_key(tmp_path / "site-0", "site-0")

    assert isinstance(load_ssh_private_key(private.read_bytes(), None), ec.EllipticCurvePrivateKey)
    assert try_load_public_key(public).startswith(b"-----BEGIN PUBLIC KEY-----")


def test_admit_rejects_claim_by_key_after_owner(tmp_path):
    store = store_with(tmp_path, ["0"])
    store.bind_node_key("0", KEY_A)
    nodes = registry(store, {1: KEY_A, 2: KEY_B})
    nodes.admit(1, "0")

    assert "bound to node key" in nodes.admit(2, "0")


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), ("false", False), ("", False)])
def test_parse_flag_values(value, expected):
    from server.app import parse_flag

    assert parse_flag(value, "bind-node-keys") is expected


def test_parse_flag_invalid():
    from server.app import parse_flag

    with pytest.raises(ValueError, match="bind-node-keys must be true or false"):
        parse_flag("maybe", "bind-node-keys")
