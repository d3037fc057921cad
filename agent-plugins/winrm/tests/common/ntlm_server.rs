//! The server side of NTLMv2 for the test server: CHALLENGE generation and AUTHENTICATE
//! verification (NTProofStr from the known password, and the MIC when the client announces
//! one). Key derivation and sealing reuse the crate's MS-NLMP primitives; those are pinned
//! independently by the spec test vectors in `src/ntlm.rs` and by interoperating with pywinrm
//! (pyspnego) in `tests/pywinrm.rs`.

use super::ntlm::{self as prim, SessionSecurity, hmac_md5, ntowfv2, utf16le};

const TARGET_TYPE_DOMAIN: u32 = 0x0001_0000;
const ALWAYS: u32 = prim::NEGOTIATE_UNICODE
    | prim::NEGOTIATE_NTLM
    | prim::NEGOTIATE_TARGET_INFO
    | prim::REQUEST_TARGET
    | TARGET_TYPE_DOMAIN;
const IF_ASKED: u32 = prim::NEGOTIATE_SIGN
    | prim::NEGOTIATE_SEAL
    | prim::NEGOTIATE_ALWAYS_SIGN
    | prim::NEGOTIATE_EXTENDED_SESSIONSECURITY
    | prim::NEGOTIATE_VERSION
    | prim::NEGOTIATE_128
    | prim::NEGOTIATE_56
    | prim::NEGOTIATE_KEY_EXCH;

pub struct Pending {
    negotiate: Vec<u8>,
    challenge: Vec<u8>,
    server_challenge: [u8; 8],
}

pub struct Verified {
    pub user: String,
    pub domain: String,
    pub security: SessionSecurity,
    /// The client sent a (non-zero) TLS channel binding and it matched.
    pub channel_bound: bool,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn payload(b: &[u8], at: usize) -> Option<&[u8]> {
    let len = usize::from(u16_at(b, at)?);
    let off = u32_at(b, at + 4)? as usize;
    b.get(off..off + len)
}

fn from_utf16(b: &[u8]) -> String {
    let units: Vec<u16> = b
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], *c.get(1).unwrap_or(&0)]))
        .collect();
    String::from_utf16_lossy(&units)
}

fn av(out: &mut Vec<u8>, id: u16, value: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
}

/// Answers a NEGOTIATE message with a CHALLENGE.
pub fn challenge(negotiate: &[u8]) -> Result<(Vec<u8>, Pending), String> {
    if negotiate.len() < 16 || &negotiate[..8] != b"NTLMSSP\0" || u32_at(negotiate, 8) != Some(1) {
        return Err("not an NTLM NEGOTIATE message".into());
    }
    let asked = u32_at(negotiate, 12).unwrap_or(0);
    let flags = ALWAYS | (asked & IF_ASKED);
    let mut server_challenge = [0u8; 8];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut server_challenge);
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let filetime = (since.as_secs() + 11_644_473_600) * 10_000_000;
    let mut info = Vec::new();
    av(&mut info, 2, &utf16le("WINTEST"));
    av(&mut info, 1, &utf16le("WINHOST"));
    av(&mut info, 4, &utf16le("wintest.local"));
    av(&mut info, 3, &utf16le("winhost.wintest.local"));
    av(&mut info, 7, &filetime.to_le_bytes());
    av(&mut info, 0, &[]);
    let name = utf16le("WINTEST");
    let mut m = Vec::new();
    m.extend_from_slice(b"NTLMSSP\0");
    m.extend_from_slice(&2u32.to_le_bytes());
    let name_off = 56u32;
    m.extend_from_slice(&(name.len() as u16).to_le_bytes());
    m.extend_from_slice(&(name.len() as u16).to_le_bytes());
    m.extend_from_slice(&name_off.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&server_challenge);
    m.extend_from_slice(&[0u8; 8]);
    let info_off = name_off + name.len() as u32;
    m.extend_from_slice(&(info.len() as u16).to_le_bytes());
    m.extend_from_slice(&(info.len() as u16).to_le_bytes());
    m.extend_from_slice(&info_off.to_le_bytes());
    m.extend_from_slice(&[10, 0, 0x7c, 0x4f, 0, 0, 0, 0x0f]);
    m.extend_from_slice(&name);
    m.extend_from_slice(&info);
    Ok((
        m.clone(),
        Pending {
            negotiate: negotiate.to_vec(),
            challenge: m,
            server_challenge,
        },
    ))
}

/// Checks an AUTHENTICATE message against the one account the server knows.
pub fn verify(
    pending: &Pending,
    auth: &[u8],
    username: &str,
    password: &str,
    channel_bindings: Option<[u8; 16]>,
) -> Result<Verified, String> {
    if auth.len() < 64 || &auth[..8] != b"NTLMSSP\0" || u32_at(auth, 8) != Some(3) {
        return Err("not an NTLM AUTHENTICATE message".into());
    }
    let nt = payload(auth, 20).ok_or("NT response out of bounds")?;
    let domain = from_utf16(payload(auth, 28).ok_or("domain out of bounds")?);
    let user = from_utf16(payload(auth, 36).ok_or("user out of bounds")?);
    let enc_key = payload(auth, 52).ok_or("session key out of bounds")?;
    let flags = u32_at(auth, 60).ok_or("no flags")?;
    if nt.len() < 16 + 28 {
        return Err("NT response too short for NTLMv2 (NTLMv1 is refused)".into());
    }
    if !user.eq_ignore_ascii_case(username) {
        return Err(format!("unknown user {user:?}"));
    }
    let (proof, temp) = nt.split_at(16);
    let key = ntowfv2(password, &user, &domain);
    if hmac_md5(&key, &[&pending.server_challenge, temp]) != proof {
        return Err("NTProofStr does not verify (wrong password)".into());
    }
    let base = hmac_md5(&key, &[proof]);
    let exported = if flags & prim::NEGOTIATE_KEY_EXCH != 0 && enc_key.len() == 16 {
        let mut k = [0u8; 16];
        k.copy_from_slice(enc_key);
        prim::Rc4::new(&base).apply(&mut k);
        k
    } else {
        base
    };
    // AV pairs start after the 28-byte blob header; a MIC is due when MsvAvFlags has bit 2.
    let mut at = 28;
    let mut mic_present = false;
    let mut channel_bound = false;
    while let (Some(id), Some(len)) = (u16_at(temp, at), u16_at(temp, at + 2)) {
        if id == 0 {
            break;
        }
        if id == 6 {
            mic_present = u32_at(temp, at + 4).unwrap_or(0) & 2 != 0;
        }
        // MsvAvChannelBindings: zeros mean "none"; anything else must match this TLS channel
        // (what `CbtHardeningLevel=Relaxed` enforces).
        if id == 0x0A {
            let value = temp.get(at + 4..at + 4 + usize::from(len)).unwrap_or(&[]);
            if value.iter().any(|b| *b != 0) {
                if Some(value) != channel_bindings.as_ref().map(|c| c.as_slice()) {
                    return Err("channel binding does not match this TLS channel".into());
                }
                channel_bound = true;
            }
        }
        at += 4 + usize::from(len);
    }
    if mic_present {
        if auth.len() < 88 {
            return Err("MIC announced but missing".into());
        }
        let mut zeroed = auth.to_vec();
        zeroed[72..88].fill(0);
        let mic = hmac_md5(
            &exported,
            &[&pending.negotiate, &pending.challenge, &zeroed],
        );
        if mic[..] != auth[72..88] {
            return Err("MIC does not verify".into());
        }
    }
    Ok(Verified {
        user,
        domain,
        security: SessionSecurity::new(&exported, flags, false),
        channel_bound,
    })
}
