from twisted.application.service import ServiceMaker

foxnode = ServiceMaker(
    "foxnode",
    "foxnode.tap",
    "The foxchain peer-to-peer node (WebSocket, peer store, gossip).",
    "foxnode",
)
