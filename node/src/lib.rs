//! Node-side frontends and the CSI Node service (filled in by the ublk and CSI issues).
