"""Writes the example notebooks from the cells below (no outputs): edit here, rerun.

    python examples/make_notebooks.py
"""

from pathlib import Path

import nbformat

HERE = Path(__file__).parent

START = '''import torch
from torch import nn

import p2pgrid
from p2pgrid.config import PeerConfig
from p2pgrid.sync import open_network_sync, unwrap'''

NOTEBOOKS = {
    "private_statistics.ipynb": [
        "# Private statistics on birth records\n\nA hospital publishes birth records; bob computes "
        "statistics on them without ever downloading a row. Every peer here is a real peer on "
        "127.0.0.1 (TLS, HTTP/2, gossip), started on a background thread by `open_network_sync`; "
        "with a real network you would use `p2pgrid.connect_sync(\"bob\", join=[...])` instead.",
        START + "\nfrom p2pgrid.datasets import birth_records",
        'grid = open_network_sync(["hospital", "bob"], ttl=30.0)\n'
        'hospital = grid.net("hospital")\n'
        '# the owner lets bob compute, and grants aggregates (means, sums...) explicitly\n'
        'hospital.publish(birth_records(500, seed=1), tags=["birth-records"],\n'
        '                 description="synthetic births: weight, age, weeks",\n'
        '                 compute=["bob"], aggregate=["bob"])\n'
        'grid.wait_searchable("#birth-records")',
        'net = grid.net("bob")\nhits = net.search("#birth-records")\nhits',
        'rec = hits["hospital"][0]\nrec',
        'mean_weight = rec[:, 0].mean().get()\nstd_all = rec.std(dim=0).get()\n'
        'print(float(mean_weight), std_all)\nassert 0 < float(mean_weight)',
        '# the rows themselves stay on the hospital\ntry:\n    rec.get()\n'
        'except p2pgrid.PermissionDenied as e:\n    print("refused:", e)\nelse:\n'
        '    raise AssertionError("the hospital released raw rows")',
        'net.me.directory',
        'grid.close()',
    ],
    "federated_digits.ipynb": [
        "# Federated learning on digits\n\nThree hospitals each hold a shard of scikit-learn's "
        "8x8 digits; `ai` trains an MLP with FedAvg without seeing any image.",
        START + "\nfrom p2pgrid.protocols.fedavg import FedAvg\nfrom p2pgrid.datasets import digits\n"
        "from p2pgrid.federated import SGD",
        'X, Y = digits()\ngrid = open_network_sync(["ai", "h1", "h2", "h3"], ttl=30.0)\n'
        'for i, name in enumerate(["h1", "h2", "h3"]):\n'
        '    rows = slice(i * 400, (i + 1) * 400)\n'
        '    grid.net(name).federated_publish(X[rows], Y[rows], tags=["digits", "train"], compute=["ai"])\n'
        'grid.net("h1").federated_publish(X[1400:], Y[1400:], tags=["digits", "test"], compute=["ai"])\n'
        'grid.wait_searchable("#digits #test")',
        '# in Jupyter the rounds bar is a widget (tqdm.auto picks tqdm.notebook); in a terminal, text\n'
        'import tqdm.auto, tqdm.notebook\nassert issubclass(tqdm.auto.tqdm, tqdm.notebook.tqdm)',
        'net = grid.net("ai")\ntorch.manual_seed(0)\n'
        'model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))\n'
        'result = net.federated_fit(model, "#digits #train", rounds=3, local_epochs=2,\n'
        '                           optimizer=SGD(lr=0.1, momentum=0.9), evaluate="#digits #test",\n'
        '                           strategy=FedAvg(min_peers=2, round_timeout=60), wait_for=3)\n'
        'result',
        'acc = result.history[-1].accuracy\nprint("accuracy", acc)\nassert acc > 0.7',
        'grid.close()',
    ],
    "encrypted_digits_training.ipynb": [
        "# Encrypted training on digits (SMPC)\n\nThe hospital's images are secret-shared between "
        "the hospital and the clinic (the university deals correlated randomness); the company "
        "trains a model on the shares. The hospital's own config approves those parties and "
        "that dealer.",
        START + "\nfrom p2pgrid import smpc\nfrom p2pgrid.datasets import digits",
        'import tempfile\nfrom pathlib import Path\ntmp = Path(tempfile.mkdtemp())\n'
        'owners = ("hospital", "clinic")\n'
        'peers = [*(PeerConfig(name=o, data_dir=tmp / o, smpc_parties=owners,\n'
        '                      crypto_providers=("university",)) for o in owners),\n'
        '         PeerConfig(name="university", roles=("crypto-provider",), data_dir=tmp / "u"),\n'
        '         "company"]\n'
        'grid = open_network_sync(peers, tmp, ttl=30.0)',
        'X, labels = digits()\nx, y = X[:128].double(), nn.functional.one_hot(labels[:128], 10).double()\n'
        'hospital = grid.net("hospital")\n'
        'hospital.publish(x, tags=["digits-images"], compute=["company"], aggregate=["company"])\n'
        'hospital.publish(y, tags=["digits-labels"], compute=["company"], aggregate=["company"])\n'
        'grid.wait_searchable("#digits-labels")',
        'net = grid.net("company")\n'
        'img = net.search("#digits-images")["hospital"][0]\n'
        'lab = net.search("#digits-labels")["hospital"][0]\n'
        'xs = img.share(*owners, dealer="university")\nys = lab.share(*owners, dealer="university")\n'
        'torch.manual_seed(0)\n'
        'model = net.encrypt_model(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)),\n'
        '                          parties=owners, dealer="university", requires_grad=True)\n'
        'opt = smpc.SGD(unwrap(model), lr=0.5)',
        'from tqdm.auto import tqdm\nlosses = []\n'
        'for epoch in tqdm(range(3), desc="encrypted epochs"):\n'
        '    for start in range(0, 128, 64):\n'
        '        rows = slice(start, start + 64)\n'
        '        losses.append(model.fit_batch(xs[rows], ys[rows], loss="mse", optimizer=opt))\n'
        'print(losses)\nassert losses[-1] < losses[0]',
        'plain = model.decrypt()\nwith torch.no_grad():\n'
        '    acc = (plain(X[1000:1200].float()).argmax(1) == labels[1000:1200]).double().mean()\n'
        'print("decrypted model accuracy", float(acc))',
        'grid.close()',
    ],
    "serving_models.ipynb": [
        "# Serving public, private and encrypted models\n\nThe hospital serves a private model "
        "(inference only, for bob); the company serves a public one (downloadable) and an "
        "encrypted one (its weights secret-shared between two parties).",
        START + "\nfrom p2pgrid.serving import Policy\nimport time",
        'import tempfile\nfrom pathlib import Path\ntmp = Path(tempfile.mkdtemp())\n'
        'bob = PeerConfig(name="bob", data_dir=tmp / "bob", smpc_parties=("hospital", "clinic"),\n'
        '                 crypto_providers=("university",))\n'
        'peers = ["company", "hospital", "clinic", bob,\n'
        '         PeerConfig(name="university", roles=("crypto-provider",), data_dir=tmp / "u")]\n'
        'grid = open_network_sync(peers, tmp, ttl=30.0)\n'
        'def model(seed):\n    torch.manual_seed(seed)\n'
        '    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()\n'
        'policy = Policy(input_shape=(None, 1, 8, 8), dtype="float32", value_range=(0, 1), users=["bob"])',
        'private, public, secret = model(0), model(1), model(2)\n'
        'grid.net("hospital").serve_model(private, "digits-private", policy=policy)\n'
        'grid.net("company").serve_model(public, "digits-public", allow_download=True)\n'
        'grid.net("company").serve_model(secret, "digits-encrypted", mpc=True, parties=["hospital", "clinic"],\n'
        '                                dealer="university", policy=policy)\n'
        'net = grid.net("bob")\nfor _ in range(400):   # until gossip brought all three\n'
        '    if {"digits-private", "digits-public", "digits-encrypted"} <= {m.name for m in net.models()}:\n'
        '        break\n    time.sleep(0.05)\nnet.models()',
        'x = torch.rand(4, 1, 8, 8)\ny = net.run_inference("digits-private", x)\n'
        'assert torch.allclose(y, private(x), atol=1e-5)\ny',
        'downloaded = net.download_model("digits-public")\n'
        'assert torch.allclose(downloaded(x), public(x), atol=1e-6)',
        'for _ in range(200):   # the encrypted model\'s announcement travels in the same record\n'
        '    if "smpc-models" in grid["bob"].record("company").services:\n        break\n'
        '    time.sleep(0.05)\n'
        'y = net.run_encrypted_inference("digits-encrypted", x)\n'
        'assert torch.allclose(y, secret(x), atol=2e-2)\ny',
        'grid.close()',
    ],
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
        nb.cells = [nbformat.v4.new_markdown_cell(cells[0])]
        nb.cells += [nbformat.v4.new_code_cell(src) for src in cells[1:]]
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
