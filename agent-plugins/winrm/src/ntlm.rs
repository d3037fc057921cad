//! The client side of NTLMv2 (MS-NLMP): NEGOTIATE, CHALLENGE, AUTHENTICATE (with MIC), and the
//! session security (sign + seal, extended session security, 128-bit, key exchange) that
//! WS-Management message encryption over plain HTTP uses (MS-WSMV 2.2.9.1.1).
//!
//! Written here rather than taken from a crate: the Rust NTLM crates are either bindings to
//! system GSSAPI/SSPI (not on an agent host, and not ring-only) or young and unmaintained, and
//! the part WinRM needs is small and fully specified. Only NTLMv2 is spoken; LM/NTLMv1 servers
//! are refused, and there is no anonymous login. Over HTTPS the AUTHENTICATE message carries
//! the TLS channel binding (`MsvAvChannelBindings`, RFC 5929 `tls-server-end-point`), which
//! a listener with `CbtHardeningLevel=Strict` requires.

use hmac::{Hmac, KeyInit, Mac};
use md4::Md4;
use md5::{Digest, Md5};
use rand::RngCore;

pub const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
pub const REQUEST_TARGET: u32 = 0x0000_0004;
pub const NEGOTIATE_SIGN: u32 = 0x0000_0010;
pub const NEGOTIATE_SEAL: u32 = 0x0000_0020;
pub const NEGOTIATE_NTLM: u32 = 0x0000_0200;
pub const NEGOTIATE_ALWAYS_SIGN: u32 = 0x0000_8000;
pub const NEGOTIATE_EXTENDED_SESSIONSECURITY: u32 = 0x0008_0000;
pub const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
pub const NEGOTIATE_VERSION: u32 = 0x0200_0000;
pub const NEGOTIATE_128: u32 = 0x2000_0000;
pub const NEGOTIATE_KEY_EXCH: u32 = 0x4000_0000;
pub const NEGOTIATE_56: u32 = 0x8000_0000;

const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
const MSV_AV_EOL: u16 = 0;
const MSV_AV_FLAGS: u16 = 6;
const MSV_AV_TIMESTAMP: u16 = 7;
const MSV_AV_CHANNEL_BINDINGS: u16 = 0x000A;
/// MsvAvFlags bit: the AUTHENTICATE message carries a MIC.
const AV_FLAG_MIC: u32 = 0x2;
/// Windows 10 / Server 2016+, NTLM revision 15.
const VERSION: [u8; 8] = [10, 0, 0x61, 0x4a, 0, 0, 0, 0x0f];

pub const CLIENT_FLAGS: u32 = NEGOTIATE_UNICODE
    | REQUEST_TARGET
    | NEGOTIATE_SIGN
    | NEGOTIATE_SEAL
    | NEGOTIATE_NTLM
    | NEGOTIATE_ALWAYS_SIGN
    | NEGOTIATE_EXTENDED_SESSIONSECURITY
    | NEGOTIATE_TARGET_INFO
    | NEGOTIATE_VERSION
    | NEGOTIATE_128
    | NEGOTIATE_KEY_EXCH
    | NEGOTIATE_56;

type HmacMd5 = Hmac<Md5>;

pub fn hmac_md5(key: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match HmacMd5::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// MD5 of the GSS channel bindings structure for a TLS server certificate (RFC 5929
/// `tls-server-end-point`, the hash of the certificate with its signature's hash algorithm,
/// SHA-256 for MD5/SHA-1 and anything unknown), as MS-NLMP's `MsvAvChannelBindings` wants it.
pub fn tls_channel_bindings(cert_der: &[u8]) -> [u8; 16] {
    let oid = x509_parser::parse_x509_certificate(cert_der)
        .ok()
        .map(|(_, c)| c.signature_algorithm.algorithm.to_id_string());
    let algorithm = match oid.as_deref() {
        // sha384WithRSAEncryption, ecdsa-with-SHA384
        Some("1.2.840.113549.1.1.12" | "1.2.840.10045.4.3.3") => &ring::digest::SHA384,
        // sha512WithRSAEncryption, ecdsa-with-SHA512
        Some("1.2.840.113549.1.1.13" | "1.2.840.10045.4.3.4") => &ring::digest::SHA512,
        _ => &ring::digest::SHA256,
    };
    let hash = ring::digest::digest(algorithm, cert_der);
    let mut app = b"tls-server-end-point:".to_vec();
    app.extend_from_slice(hash.as_ref());
    // Initiator and acceptor address types and addresses: all empty.
    let mut bindings = vec![0u8; 16];
    bindings.extend_from_slice(&u32::try_from(app.len()).unwrap_or(0).to_le_bytes());
    bindings.extend_from_slice(&app);
    md5(&[&bindings])
}

fn md5(parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// NTOWFv2: HMAC-MD5 keyed with MD4(password) over UPPER(user) + domain, all UTF-16LE.
pub fn ntowfv2(password: &str, user: &str, domain: &str) -> [u8; 16] {
    let nt_hash: [u8; 16] = Md4::digest(utf16le(password)).into();
    let mut ident = utf16le(&user.to_uppercase());
    ident.extend(utf16le(domain));
    hmac_md5(&nt_hash, &[&ident])
}

/// RC4, which MS-NLMP's sealing and key exchange require (and nothing else should use).
#[derive(Clone)]
pub struct Rc4 {
    s: [u8; 256],
    i: u8,
    j: u8,
}

impl Rc4 {
    pub fn new(key: &[u8]) -> Self {
        let mut s = [0u8; 256];
        for (n, v) in s.iter_mut().enumerate() {
            *v = n as u8;
        }
        let mut j: u8 = 0;
        for i in 0..256 {
            j = j.wrapping_add(s[i]).wrapping_add(key[i % key.len()]);
            s.swap(i, j as usize);
        }
        Self { s, i: 0, j: 0 }
    }

    pub fn apply(&mut self, data: &mut [u8]) {
        for b in data.iter_mut() {
            self.i = self.i.wrapping_add(1);
            self.j = self.j.wrapping_add(self.s[self.i as usize]);
            self.s.swap(self.i as usize, self.j as usize);
            let k =
                self.s[(self.s[self.i as usize].wrapping_add(self.s[self.j as usize])) as usize];
            *b ^= k;
        }
    }
}

fn field(len: usize, offset: usize) -> [u8; 8] {
    let mut f = [0u8; 8];
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    f[0..2].copy_from_slice(&len.to_le_bytes());
    f[2..4].copy_from_slice(&len.to_le_bytes());
    f[4..8].copy_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
    f
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The payload a (len, maxlen, offset) field at `at` points to.
fn payload(b: &[u8], at: usize) -> Option<&[u8]> {
    let len = usize::from(u16_at(b, at)?);
    let offset = usize::try_from(u32_at(b, at + 4)?).ok()?;
    b.get(offset..offset.checked_add(len)?)
}

/// Splits `DOMAIN\user`; `user@domain` (UPN) and bare names are sent as the user name with an
/// empty domain, which is how Windows expects UPNs.
pub fn split_user(username: &str) -> (&str, &str) {
    match username.split_once('\\') {
        Some((domain, user)) => (domain, user),
        None => ("", username),
    }
}

pub fn negotiate_message() -> Vec<u8> {
    let mut m = Vec::with_capacity(40);
    m.extend_from_slice(SIGNATURE);
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&CLIENT_FLAGS.to_le_bytes());
    m.extend_from_slice(&field(0, 40));
    m.extend_from_slice(&field(0, 40));
    m.extend_from_slice(&VERSION);
    m
}

#[derive(Debug)]
pub struct Challenge {
    pub flags: u32,
    pub server_challenge: [u8; 8],
    pub target_info: Vec<(u16, Vec<u8>)>,
}

pub fn parse_challenge(b: &[u8]) -> Result<Challenge, String> {
    if b.len() < 48 || &b[0..8] != SIGNATURE || u32_at(b, 8) != Some(2) {
        return Err("the server's NTLM challenge is not an NTLMSSP CHALLENGE message".to_string());
    }
    let flags = u32_at(b, 20).ok_or("truncated challenge")?;
    let mut server_challenge = [0u8; 8];
    server_challenge.copy_from_slice(&b[24..32]);
    let info = payload(b, 40).ok_or("challenge target info out of bounds")?;
    let mut target_info = Vec::new();
    let mut at = 0;
    loop {
        let id = u16_at(info, at).ok_or("truncated target info")?;
        let len = usize::from(u16_at(info, at + 2).ok_or("truncated target info")?);
        if id == MSV_AV_EOL {
            break;
        }
        let value = info
            .get(at + 4..at + 4 + len)
            .ok_or("target info pair out of bounds")?;
        target_info.push((id, value.to_vec()));
        at += 4 + len;
    }
    if target_info.is_empty() {
        // NTLMv2 needs the server's AV pairs; a server without them only speaks NTLMv1.
        return Err(
            "the server's NTLM challenge carries no target info (NTLMv1 only?)".to_string(),
        );
    }
    Ok(Challenge {
        flags,
        server_challenge,
        target_info,
    })
}

fn filetime_now() -> [u8; 8] {
    let since_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ticks = (since_unix.as_secs() + 11_644_473_600) * 10_000_000
        + u64::from(since_unix.subsec_nanos() / 100);
    ticks.to_le_bytes()
}

/// What the AUTHENTICATE step produces: the message and the keys for message security.
pub struct Authenticated {
    pub message: Vec<u8>,
    pub security: SessionSecurity,
}

/// Builds the AUTHENTICATE message for `challenge`, given the NEGOTIATE message that was sent
/// (the MIC covers all three messages).
pub fn authenticate(
    negotiate: &[u8],
    challenge_bytes: &[u8],
    username: &str,
    password: &str,
    channel_bindings: Option<[u8; 16]>,
) -> Result<Authenticated, String> {
    let challenge = parse_challenge(challenge_bytes)?;
    let flags = challenge.flags & CLIENT_FLAGS;
    if flags & NEGOTIATE_UNICODE == 0 {
        return Err("the server did not accept Unicode NTLM".to_string());
    }
    if flags & NEGOTIATE_EXTENDED_SESSIONSECURITY == 0 || flags & NEGOTIATE_128 == 0 {
        return Err(
            "the server did not negotiate 128-bit NTLM extended session security".to_string(),
        );
    }
    let (domain, user) = split_user(username);
    let key = ntowfv2(password, user, domain);

    let mut client_challenge = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut client_challenge);
    let server_timestamp = challenge
        .target_info
        .iter()
        .find(|(id, _)| *id == MSV_AV_TIMESTAMP)
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok());
    let timestamp = server_timestamp.unwrap_or_else(filetime_now);

    // The server's pairs, with MsvAvFlags saying that a MIC follows.
    let mut av = Vec::new();
    let mut has_flags = false;
    for (id, value) in &challenge.target_info {
        if *id == MSV_AV_CHANNEL_BINDINGS {
            continue;
        }
        let mut value = value.clone();
        if *id == MSV_AV_FLAGS {
            let old = value
                .get(0..4)
                .and_then(|v| <[u8; 4]>::try_from(v).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0);
            value = (old | AV_FLAG_MIC).to_le_bytes().to_vec();
            has_flags = true;
        }
        av.extend_from_slice(&id.to_le_bytes());
        av.extend_from_slice(&u16::try_from(value.len()).unwrap_or(0).to_le_bytes());
        av.extend_from_slice(&value);
    }
    if !has_flags {
        av.extend_from_slice(&MSV_AV_FLAGS.to_le_bytes());
        av.extend_from_slice(&4u16.to_le_bytes());
        av.extend_from_slice(&AV_FLAG_MIC.to_le_bytes());
    }
    // All zeros without TLS, as Windows clients send it.
    av.extend_from_slice(&MSV_AV_CHANNEL_BINDINGS.to_le_bytes());
    av.extend_from_slice(&16u16.to_le_bytes());
    av.extend_from_slice(&channel_bindings.unwrap_or([0; 16]));
    av.extend_from_slice(&[0, 0, 0, 0]);

    let mut temp = vec![1, 1, 0, 0, 0, 0, 0, 0];
    temp.extend_from_slice(&timestamp);
    temp.extend_from_slice(&client_challenge);
    temp.extend_from_slice(&[0, 0, 0, 0]);
    temp.extend_from_slice(&av);
    temp.extend_from_slice(&[0, 0, 0, 0]);
    let nt_proof = hmac_md5(&key, &[&challenge.server_challenge, &temp]);
    let mut nt_response = nt_proof.to_vec();
    nt_response.extend_from_slice(&temp);
    // With a server timestamp the LMv2 response must be zeros (MS-NLMP 3.1.5.1.2).
    let lm_response = if server_timestamp.is_some() {
        vec![0u8; 24]
    } else {
        let mut lm = hmac_md5(&key, &[&challenge.server_challenge, &client_challenge]).to_vec();
        lm.extend_from_slice(&client_challenge);
        lm
    };
    let session_base_key = hmac_md5(&key, &[&nt_proof]);
    let (exported, encrypted_key) = if flags & NEGOTIATE_KEY_EXCH != 0 {
        let mut exported = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut exported);
        let mut enc = exported;
        Rc4::new(&session_base_key).apply(&mut enc);
        (exported, enc.to_vec())
    } else {
        (session_base_key, Vec::new())
    };

    let domain_b = utf16le(domain);
    let user_b = utf16le(user);
    let workstation_b: Vec<u8> = Vec::new();
    let mut offset = 88;
    let mut header = Vec::with_capacity(88);
    header.extend_from_slice(SIGNATURE);
    header.extend_from_slice(&3u32.to_le_bytes());
    let mut body = Vec::new();
    // Payload order differs from field order, as Windows lays it out.
    let mut put = |data: &[u8], body: &mut Vec<u8>| {
        let f = field(data.len(), offset);
        body.extend_from_slice(data);
        offset += data.len();
        f
    };
    let domain_f = put(&domain_b, &mut body);
    let user_f = put(&user_b, &mut body);
    let ws_f = put(&workstation_b, &mut body);
    let lm_f = put(&lm_response, &mut body);
    let nt_f = put(&nt_response, &mut body);
    let key_f = put(&encrypted_key, &mut body);
    header.extend_from_slice(&lm_f);
    header.extend_from_slice(&nt_f);
    header.extend_from_slice(&domain_f);
    header.extend_from_slice(&user_f);
    header.extend_from_slice(&ws_f);
    header.extend_from_slice(&key_f);
    header.extend_from_slice(&flags.to_le_bytes());
    header.extend_from_slice(&VERSION);
    header.extend_from_slice(&[0u8; 16]);
    let mut message = header;
    message.extend_from_slice(&body);
    let mic = hmac_md5(&exported, &[negotiate, challenge_bytes, &message]);
    message[72..88].copy_from_slice(&mic);

    Ok(Authenticated {
        message,
        security: SessionSecurity::new(&exported, flags, true),
    })
}

fn derive(exported: &[u8; 16], magic: &str) -> [u8; 16] {
    md5(&[exported, magic.as_bytes(), &[0]])
}

/// Sign-and-seal state of one established NTLM context, one RC4 stream per direction.
pub struct SessionSecurity {
    key_exch: bool,
    out_sign: [u8; 16],
    out_seal: Rc4,
    out_seq: u32,
    in_sign: [u8; 16],
    in_seal: Rc4,
    in_seq: u32,
}

impl SessionSecurity {
    /// `client`: whether this side is the client (decides which direction's keys go out).
    pub fn new(exported: &[u8; 16], flags: u32, client: bool) -> Self {
        let c2s = "session key to client-to-server";
        let s2c = "session key to server-to-client";
        let (out_dir, in_dir) = if client { (c2s, s2c) } else { (s2c, c2s) };
        Self {
            key_exch: flags & NEGOTIATE_KEY_EXCH != 0,
            out_sign: derive(exported, &format!("{out_dir} signing key magic constant")),
            out_seal: Rc4::new(&derive(
                exported,
                &format!("{out_dir} sealing key magic constant"),
            )),
            out_seq: 0,
            in_sign: derive(exported, &format!("{in_dir} signing key magic constant")),
            in_seal: Rc4::new(&derive(
                exported,
                &format!("{in_dir} sealing key magic constant"),
            )),
            in_seq: 0,
        }
    }

    /// Encrypts `message` in place and returns its 16-byte signature.
    pub fn seal(&mut self, message: &mut [u8]) -> [u8; 16] {
        let seq = self.out_seq.to_le_bytes();
        let mac = hmac_md5(&self.out_sign, &[&seq, message]);
        self.out_seal.apply(message);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&mac[..8]);
        if self.key_exch {
            self.out_seal.apply(&mut checksum);
        }
        self.out_seq = self.out_seq.wrapping_add(1);
        let mut sig = [0u8; 16];
        sig[0] = 1;
        sig[4..12].copy_from_slice(&checksum);
        sig[12..16].copy_from_slice(&seq);
        sig
    }

    /// Decrypts `sealed` in place and checks its signature.
    pub fn unseal(&mut self, sealed: &mut [u8], signature: &[u8]) -> Result<(), String> {
        if signature.len() != 16 || signature[0..4] != [1, 0, 0, 0] {
            return Err("malformed NTLM message signature".to_string());
        }
        let seq = self.in_seq.to_le_bytes();
        self.in_seal.apply(sealed);
        let mac = hmac_md5(&self.in_sign, &[&seq, sealed]);
        let mut checksum = [0u8; 8];
        checksum.copy_from_slice(&mac[..8]);
        if self.key_exch {
            self.in_seal.apply(&mut checksum);
        }
        self.in_seq = self.in_seq.wrapping_add(1);
        if signature[4..12] != checksum || signature[12..16] != seq {
            return Err(
                "NTLM message signature does not verify (tampered or out of order)".to_string(),
            );
        }
        Ok(())
    }
}
