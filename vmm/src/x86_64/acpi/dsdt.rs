//! The DSDT: the devices a guest cannot discover by probing, described in AML.
//!
//! A device is given as a [`DeviceDescription`] (its ACPI name, `_HID`, `_UID` and the
//! resources of its `_CRS`); [`dsdt_aml`] turns a list of them into the DSDT's AML body,
//! one `Device (\_SB_.<name>)` each. The VMM describes COM1 today; further devices (for
//! example virtio-mmio transports, `_HID "LNRO0005"` with an MMIO range and an interrupt)
//! are more entries in the same list.

use acpi_tables::aml::{self, Device, EISAName, Name, ResourceTemplate};
use acpi_tables::Aml;

use super::AcpiError;

/// How a guest identifies a device (its `_HID`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HardwareId {
    /// A compressed EISA id: three upper-case letters and four hex digits (`PNP0501`).
    Eisa(String),
    /// An id string, such as an ACPI or vendor id (`LNRO0005` for virtio-mmio).
    Text(String),
}

/// How an interrupt line signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Edge-triggered, active high (ISA devices).
    EdgeHigh,
    /// Level-triggered, active high.
    LevelHigh,
    /// Level-triggered, active low (PCI INTx).
    LevelLow,
}

/// One resource a device decodes, listed in its `_CRS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `len` I/O ports from `base`.
    Io {
        /// First port.
        base: u16,
        /// Number of ports.
        len: u8,
    },
    /// A fixed 32-bit MMIO range.
    Mmio {
        /// Guest-physical base.
        base: u32,
        /// Length in bytes.
        len: u32,
    },
    /// An interrupt, as a global system interrupt (an IOAPIC pin: GSI base is 0).
    Interrupt {
        /// The GSI.
        gsi: u32,
        /// How it signals.
        trigger: Trigger,
    },
}

/// One device for the DSDT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDescription {
    /// The ACPI name under `\_SB_`: four characters of `A-Z`, `0-9`, `_`, not starting
    /// with a digit.
    pub name: String,
    /// `_HID`.
    pub hid: HardwareId,
    /// `_UID`: tells apart devices with the same `_HID`.
    pub uid: u32,
    /// `_CRS`.
    pub resources: Vec<Resource>,
}

impl DeviceDescription {
    /// A 16550-compatible UART (`PNP0501`) at `port` (8 ports) on ISA IRQ `irq`.
    pub fn uart(name: &str, uid: u32, port: u16, irq: u32) -> Self {
        Self {
            name: name.to_string(),
            hid: HardwareId::Eisa("PNP0501".into()),
            uid,
            resources: vec![
                Resource::Io { base: port, len: 8 },
                Resource::Interrupt {
                    gsi: irq,
                    trigger: Trigger::EdgeHigh,
                },
            ],
        }
    }

    /// Checks what the AML encoder would otherwise reject by panicking.
    fn validate(&self) -> Result<(), AcpiError> {
        let bad = |why: &str| AcpiError::BadDevice {
            name: self.name.clone(),
            why: why.to_string(),
        };
        let n = self.name.as_bytes();
        if n.len() != 4
            || n[0].is_ascii_digit()
            || !n
                .iter()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'_')
        {
            return Err(bad("the name must be 4 characters of A-Z, 0-9, _"));
        }
        match &self.hid {
            HardwareId::Eisa(id) => {
                let b = id.as_bytes();
                if b.len() != 7
                    || !b[..3].iter().all(u8::is_ascii_uppercase)
                    || !b[3..].iter().all(u8::is_ascii_hexdigit)
                {
                    return Err(bad("an EISA id is 3 upper-case letters and 4 hex digits"));
                }
            }
            HardwareId::Text(id) => {
                if id.is_empty() || !id.bytes().all(|c| c.is_ascii_graphic()) {
                    return Err(bad("a _HID string must be printable ASCII"));
                }
            }
        }
        for r in &self.resources {
            match *r {
                Resource::Io { base, len }
                    if len == 0 || u32::from(base) + u32::from(len) > 0x1_0000 =>
                {
                    return Err(bad("an I/O range must be non-empty and below 0x10000"));
                }
                Resource::Mmio { base, len }
                    if len == 0 || u64::from(base) + u64::from(len) > 1 << 32 =>
                {
                    return Err(bad("an MMIO range must be non-empty and below 4 GiB"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Appends this device's AML to `sink`.
    fn append_aml(&self, sink: &mut Vec<u8>) {
        let hid_eisa;
        let hid_text;
        let hid: &dyn Aml = match &self.hid {
            HardwareId::Eisa(id) => {
                hid_eisa = EISAName::new(id);
                &hid_eisa
            }
            HardwareId::Text(id) => {
                hid_text = id.clone();
                &hid_text
            }
        };
        let resources: Vec<Box<dyn Aml>> = self.resources.iter().map(resource_aml).collect();
        let crs = ResourceTemplate::new(resources.iter().map(|r| r.as_ref()).collect());
        let path = format!("_SB_.{}", self.name);
        let hid_name = Name::new("_HID".into(), hid);
        let uid_name = Name::new("_UID".into(), &self.uid);
        let crs_name = Name::new("_CRS".into(), &crs);
        Device::new(path.as_str().into(), vec![&hid_name, &uid_name, &crs_name]).to_aml_bytes(sink);
    }
}

fn resource_aml(r: &Resource) -> Box<dyn Aml> {
    match *r {
        Resource::Io { base, len } => Box::new(aml::IO::new(base, base, 1, len)),
        Resource::Mmio { base, len } => Box::new(aml::Memory32Fixed::new(true, base, len)),
        Resource::Interrupt { gsi, trigger } => {
            let (edge, active_low) = match trigger {
                Trigger::EdgeHigh => (true, false),
                Trigger::LevelHigh => (false, false),
                Trigger::LevelLow => (false, true),
            };
            Box::new(aml::Interrupt::new(true, edge, active_low, false, gsi))
        }
    }
}

/// The DSDT's AML body (everything after its header) for `devices`.
pub fn dsdt_aml(devices: &[DeviceDescription]) -> Result<Vec<u8>, AcpiError> {
    let mut names = std::collections::HashSet::new();
    for d in devices {
        d.validate()?;
        if !names.insert(d.name.as_str()) {
            return Err(AcpiError::BadDevice {
                name: d.name.clone(),
                why: "two devices with the same name".into(),
            });
        }
    }
    let mut aml = Vec::new();
    for d in devices {
        d.append_aml(&mut aml);
    }
    Ok(aml)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn com1_encodes_as_pnp0501_with_its_ports_and_irq() {
        let aml = dsdt_aml(&[DeviceDescription::uart("COM1", 0, 0x3f8, 4)]).unwrap();
        // DeviceOp, then the path \_SB_.COM1 as a dual name.
        assert_eq!(&aml[..2], &[0x5b, 0x82]);
        let find = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(find(b"\x2e_SB_COM1"), "{aml:02x?}");
        // _HID EISAID("PNP0501") as a DWordConst.
        assert!(find(&[
            0x08, b'_', b'H', b'I', b'D', 0x0c, 0x41, 0xd0, 0x05, 0x01
        ]));
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8).
        assert!(find(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // Extended interrupt: consumer, edge, active high, exclusive; one GSI, 4.
        assert!(find(&[
            0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00
        ]));
    }

    #[test]
    fn invalid_descriptions_are_errors_not_panics() {
        let ok = DeviceDescription::uart("COM1", 0, 0x3f8, 4);
        for bad in [
            DeviceDescription {
                name: "COM".into(),
                ..ok.clone()
            },
            DeviceDescription {
                name: "1COM".into(),
                ..ok.clone()
            },
            DeviceDescription {
                name: "com1".into(),
                ..ok.clone()
            },
            DeviceDescription {
                hid: HardwareId::Eisa("PNP05".into()),
                ..ok.clone()
            },
            DeviceDescription {
                hid: HardwareId::Eisa("pnp0501".into()),
                ..ok.clone()
            },
            DeviceDescription {
                resources: vec![Resource::Io {
                    base: 0xfffc,
                    len: 8,
                }],
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(
                    dsdt_aml(std::slice::from_ref(&bad)),
                    Err(AcpiError::BadDevice { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(dsdt_aml(&[ok.clone(), ok]).is_err(), "duplicate names");
    }

    #[test]
    fn more_devices_are_more_entries() {
        let virtio = DeviceDescription {
            name: "VR00".into(),
            hid: HardwareId::Text("LNRO0005".into()),
            uid: 0,
            resources: vec![
                Resource::Mmio {
                    base: 0xd000_0000,
                    len: 0x1000,
                },
                Resource::Interrupt {
                    gsi: 5,
                    trigger: Trigger::EdgeHigh,
                },
            ],
        };
        let one = dsdt_aml(&[DeviceDescription::uart("COM1", 0, 0x3f8, 4)]).unwrap();
        let two = dsdt_aml(&[DeviceDescription::uart("COM1", 0, 0x3f8, 4), virtio]).unwrap();
        assert!(two.starts_with(&one));
        assert!(two.windows(9).any(|w| w == b"LNRO0005\0"));
    }
}
