//! The iSCSI driver over loopback TCP with the in-memory test target: a misbehaving
//! connection is closed while another session keeps working; shutdown is graceful.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use sva_node::iscsi::driver::serve;
use sva_node::iscsi::nego::parse_text;
use sva_node::iscsi::pdu::{
    self, Bhs, DataOut, Digests, LoginReq, LogoutReq, Pdu, ScsiCmd, TextReq, RESERVED_TAG,
};
use sva_node::iscsi::testing::MemTarget;
use sva_node::iscsi::TargetConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const IQN: &str = "iqn.2024-01.io.sva:vol1";

struct Client {
    s: TcpStream,
    buf: BytesMut,
    cmd_sn: u32,
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            cmd_sn: 1,
        }
    }
    async fn send(&mut self, p: Pdu) {
        let mut out = BytesMut::new();
        pdu::encode(&p, Digests::default(), &mut out);
        self.s.write_all(&out).await.unwrap();
    }
    /// Next PDU, or None when the target closed the connection.
    async fn recv(&mut self) -> Option<Pdu> {
        loop {
            if let Some(p) = pdu::decode(&mut self.buf, Digests::default(), 1 << 24).unwrap() {
                return Some(p);
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.s.read_buf(&mut self.buf))
                .await
                .expect("target did not answer in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }
    async fn login(&mut self, isid_last: u8, session: &str) {
        let text = format!(
            "InitiatorName=iqn.2024-01.test:ini\0TargetName={IQN}\0SessionType={session}\0MaxRecvDataSegmentLength=8192\0InitialR2T=Yes\0ImmediateData=No\0"
        );
        let req = LoginReq {
            transit: true,
            cont: false,
            csg: 1,
            nsg: 3,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, isid_last],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
        };
        self.send(Pdu::new(Bhs::LoginReq(req), Bytes::from(text)))
            .await;
        let Some(Pdu {
            bhs: Bhs::LoginResp(r),
            ..
        }) = self.recv().await
        else {
            panic!("no login response")
        };
        assert_eq!((r.status_class, r.status_detail, r.nsg), (0, 0, 3));
    }
    fn cmd(&mut self, itt: u32, cdb: &[u8], edtl: u32, write: bool) -> Pdu {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let h = ScsiCmd {
            immediate: false,
            final_: true,
            read: !write,
            write,
            attr: 1,
            lun: 0,
            itt,
            edtl,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: 0,
            cdb: c,
        };
        self.cmd_sn += 1;
        Pdu::new(Bhs::ScsiCmd(h), Bytes::new())
    }
    async fn write(&mut self, itt: u32, lba: u8, data: &[u8]) {
        let blocks = (data.len() / 512) as u8;
        let p = self.cmd(
            itt,
            &[0x2a, 0, 0, 0, 0, lba, 0, 0, blocks, 0],
            data.len() as u32,
            true,
        );
        self.send(p).await;
        let mut off = 0;
        loop {
            match self.recv().await.expect("closed during write").bhs {
                Bhs::R2t(r) => {
                    let end = (r.buffer_offset + r.desired_len) as usize;
                    let mut sn = 0;
                    while off < end {
                        let n = (end - off).min(8192);
                        let h = DataOut {
                            final_: off + n == end,
                            lun: 0,
                            itt,
                            ttt: r.ttt,
                            exp_stat_sn: 0,
                            data_sn: sn,
                            buffer_offset: off as u32,
                        };
                        self.send(Pdu::new(
                            Bhs::DataOut(h),
                            Bytes::copy_from_slice(&data[off..off + n]),
                        ))
                        .await;
                        off += n;
                        sn += 1;
                    }
                }
                Bhs::ScsiResp(r) => {
                    assert_eq!((r.itt, r.status), (itt, 0));
                    return;
                }
                b => panic!("unexpected {b:?}"),
            }
        }
    }
    async fn read(&mut self, itt: u32, lba: u8, len: usize) -> Vec<u8> {
        let blocks = (len / 512) as u8;
        let p = self.cmd(
            itt,
            &[0x28, 0, 0, 0, 0, lba, 0, 0, blocks, 0],
            len as u32,
            false,
        );
        self.send(p).await;
        let mut out = Vec::new();
        loop {
            let p = self.recv().await.expect("closed during read");
            match p.bhs {
                Bhs::DataIn(d) => {
                    assert_eq!(d.buffer_offset as usize, out.len());
                    out.extend_from_slice(&p.data);
                    if d.has_status {
                        assert_eq!(d.status, 0);
                        return out;
                    }
                }
                Bhs::ScsiResp(r) => {
                    assert_eq!(r.status, 0);
                    return out;
                }
                b => panic!("unexpected {b:?}"),
            }
        }
    }
}

async fn start() -> (
    std::net::SocketAddr,
    Arc<MemTarget>,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let target = MemTarget::new(2048);
    let cfg = Arc::new(TargetConfig::new(IQN, format!("{addr},1")));
    let (tx, rx) = tokio::sync::watch::channel(false);
    let t: Arc<dyn sva_node::scsi::ScsiTarget> = target.clone();
    let h = tokio::spawn(async move { serve(listener, cfg, t, rx).await.unwrap() });
    (addr, target, tx, h)
}

#[tokio::test]
async fn malformed_connection_is_dropped_others_keep_working() {
    let (addr, target, stop, server) = start().await;
    let mut good = Client::connect(addr).await;
    good.login(1, "Normal").await;
    let data: Vec<u8> = (0..20480u32).map(|i| (i % 251) as u8).collect();
    good.write(1, 8, &data).await;

    // Garbage before login: closed without a reply.
    let mut bad = Client::connect(addr).await;
    bad.s.write_all(&[0xffu8; 48]).await.unwrap();
    assert!(bad.recv().await.is_none());

    // Oversized data segment after login: that connection only is closed.
    let mut big = Client::connect(addr).await;
    big.login(2, "Normal").await;
    let mut hdr = [0u8; 48];
    hdr[0] = 0x00; // NOP-Out
    hdr[5..8].copy_from_slice(&[0x10, 0, 0]); // 1 MiB > our 256 KiB
    big.s.write_all(&hdr).await.unwrap();
    assert!(big.recv().await.is_none());

    // Unknown opcode in full feature phase: Reject, connection stays up.
    let mut rej = Client::connect(addr).await;
    rej.login(3, "Normal").await;
    let mut raw = [0u8; 48];
    raw[0] = 0x1d;
    rej.send(Pdu::new(Bhs::parse(&raw), Bytes::new())).await;
    assert!(matches!(
        rej.recv().await.map(|p| p.bhs),
        Some(Bhs::Reject(_))
    ));

    assert_eq!(good.read(2, 8, 20480).await, data);
    assert!(target.executed.load(Ordering::Relaxed) >= 2);

    // Discovery.
    let mut disc = Client::connect(addr).await;
    disc.login(4, "Discovery").await;
    let tr = TextReq {
        immediate: true,
        final_: true,
        cont: false,
        lun: 0,
        itt: 9,
        ttt: RESERVED_TAG,
        cmd_sn: disc.cmd_sn,
        exp_stat_sn: 0,
    };
    disc.send(Pdu::new(
        Bhs::TextReq(tr),
        Bytes::from_static(b"SendTargets=All\0"),
    ))
    .await;
    let p = disc.recv().await.unwrap();
    let kv = parse_text(&p.data).unwrap();
    assert_eq!(kv[0], ("TargetName".to_string(), IQN.to_string()));

    // Logout, then graceful shutdown of the whole target.
    let lo = LogoutReq {
        immediate: true,
        reason: 0,
        itt: 3,
        cid: 0,
        cmd_sn: good.cmd_sn,
        exp_stat_sn: 0,
    };
    good.send(Pdu::new(Bhs::LogoutReq(lo), Bytes::new())).await;
    assert!(matches!(
        good.recv().await.map(|p| p.bhs),
        Some(Bhs::LogoutResp(_))
    ));
    assert!(good.recv().await.is_none());
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    let log = target.nexus_log.lock().unwrap().clone();
    let added = log.iter().filter(|l| l.starts_with('+')).count();
    let removed = log.iter().filter(|l| l.starts_with('-')).count();
    assert_eq!((added, removed), (3, 3), "{log:?}");
}

#[tokio::test]
async fn reinstatement_replaces_the_old_session() {
    let (addr, target, stop, server) = start().await;
    let mut a = Client::connect(addr).await;
    a.login(7, "Normal").await;
    let mut b = Client::connect(addr).await;
    b.login(7, "Normal").await;
    // The old connection is closed by the target.
    assert!(a.recv().await.is_none());
    assert_eq!(b.read(1, 0, 512).await.len(), 512);
    let log = target.nexus_log.lock().unwrap().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    assert!(
        log[0].starts_with('+') && log[1].starts_with('-') && log[2].starts_with('+'),
        "{log:?}"
    );
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
}
