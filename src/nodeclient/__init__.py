"""nodeclient: the node client of a decentralized compute network, and its reference coordinator.

Spec section 2.3 maps onto the packages as follows (docs/architecture.md has the full table):

- 2.3.1 Key Management ........ nodeclient.node.keys, nodeclient.node.securefile
- 2.3.2 Capability Manifest ... nodeclient.protocol.manifest, nodeclient.node.hardware
- 2.3.4 Payload Decryption .... nodeclient.protocol.envelope
- 2.3.6 Proof-of-Execution .... nodeclient.protocol.proof
- 2.3.7 Signed Return ......... nodeclient.protocol.eip712
"""

__version__ = "0.1.0"
