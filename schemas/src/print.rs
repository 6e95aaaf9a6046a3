//! Printing: what a device's printer can really do, and the settings a print job asks for.

use serde::{Deserialize, Serialize};

/// What a device's printer can do, as it registers its printer queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Capabilities {
    /// Media sizes it can print on (`A4`, `Letter`, ...).
    pub media_sizes: Vec<String>,
    /// Colour printing; `false`: monochrome only.
    pub color: bool,
    /// Two-sided printing; `false`: simplex only.
    pub duplex: bool,
    pub resolutions_dpi: Vec<u32>,
    /// Finishing it can do (`staple`, `punch`, ...).
    #[serde(default)]
    pub finishing: Vec<String>,
    /// Most copies of one job (at least 1).
    pub max_copies: u16,
}

/// The settings a print job asks for; what is not given is the device's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PrintSettings {
    pub media_size: Option<String>,
    pub color: Option<bool>,
    pub duplex: Option<bool>,
    pub resolution_dpi: Option<u32>,
    pub finishing: Vec<String>,
    pub copies: Option<u16>,
}

/// A printer's page counters. A consistent reading has `total == color + mono` and `total`
/// equal to the sum over media sizes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct PageCounters {
    pub total: u64,
    pub color: u64,
    pub mono: u64,
    pub per_media: std::collections::BTreeMap<String, u64>,
}

impl PageCounters {
    /// Whether the reading is whole: taken while no page was being counted.
    pub fn is_consistent(&self) -> bool {
        self.color.checked_add(self.mono) == Some(self.total)
            && self
                .per_media
                .values()
                .try_fold(0u64, |a, v| a.checked_add(*v))
                == Some(self.total)
    }

    /// The first counter that is lower than in `earlier`, if any.
    pub fn went_backwards(&self, earlier: &PageCounters) -> Option<String> {
        let fields = [
            ("total", self.total, earlier.total),
            ("color", self.color, earlier.color),
            ("mono", self.mono, earlier.mono),
        ];
        if let Some((name, now, before)) = fields.iter().find(|(_, now, before)| now < before) {
            return Some(format!("{name} went from {before} to {now}"));
        }
        earlier.per_media.iter().find_map(|(media, before)| {
            let now = self.per_media.get(media).copied().unwrap_or(0);
            (now < *before).then(|| format!("{media} went from {before} to {now}"))
        })
    }
}

/// A setting the printer cannot honour.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting} {requested} is not supported (the printer offers {offered})")]
pub struct Unsupported {
    /// The setting's name, as in [`PrintSettings`].
    pub setting: &'static str,
    pub requested: String,
    pub offered: String,
}

impl Capabilities {
    /// Checks the registration itself: something to print on, bounded lists.
    pub fn validate(&self) -> Result<(), String> {
        let names_ok =
            |l: &[String]| l.len() <= 32 && l.iter().all(|n| !n.is_empty() && n.len() <= 64);
        if self.media_sizes.is_empty() || !names_ok(&self.media_sizes) {
            return Err("media_sizes: 1 to 32 names of 1 to 64 bytes".into());
        }
        if self.resolutions_dpi.is_empty() || self.resolutions_dpi.len() > 16 {
            return Err("resolutions_dpi: 1 to 16 values".into());
        }
        if !names_ok(&self.finishing) {
            return Err("finishing: at most 32 names of 1 to 64 bytes".into());
        }
        if self.max_copies == 0 {
            return Err("max_copies must be at least 1".into());
        }
        Ok(())
    }
}

impl PrintSettings {
    /// The first setting `caps` cannot honour, if any.
    pub fn check(&self, caps: &Capabilities) -> Result<(), Unsupported> {
        let list = |l: &[String]| l.join(", ");
        if let Some(m) = &self.media_size
            && !caps.media_sizes.contains(m)
        {
            return Err(Unsupported {
                setting: "media_size",
                requested: m.clone(),
                offered: list(&caps.media_sizes),
            });
        }
        if self.color == Some(true) && !caps.color {
            return Err(Unsupported {
                setting: "color",
                requested: "true".into(),
                offered: "monochrome only".into(),
            });
        }
        if self.duplex == Some(true) && !caps.duplex {
            return Err(Unsupported {
                setting: "duplex",
                requested: "true".into(),
                offered: "simplex only".into(),
            });
        }
        if let Some(r) = self.resolution_dpi
            && !caps.resolutions_dpi.contains(&r)
        {
            return Err(Unsupported {
                setting: "resolution_dpi",
                requested: r.to_string(),
                offered: caps
                    .resolutions_dpi
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if let Some(f) = self.finishing.iter().find(|f| !caps.finishing.contains(f)) {
            return Err(Unsupported {
                setting: "finishing",
                requested: f.clone(),
                offered: if caps.finishing.is_empty() {
                    "none".into()
                } else {
                    list(&caps.finishing)
                },
            });
        }
        if let Some(c) = self.copies
            && (c == 0 || c > caps.max_copies)
        {
            return Err(Unsupported {
                setting: "copies",
                requested: c.to_string(),
                offered: format!("1 to {}", caps.max_copies),
            });
        }
        Ok(())
    }
}

/// `u/{user_id}`: a person who prints with held jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct UserRecord {
    pub user_id: crate::UserId,
    pub name: String,
    /// SHA-256 of `{user_id}:{pin}`, hex.
    pub pin_sha256: String,
    /// SHA-256 of the user's API token (for their own held jobs), hex.
    #[serde(default)]
    pub token_sha256: String,
    pub created_at: crate::UnixMillis,
}

/// Where a held job stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HeldState {
    /// Waiting in the user's virtual printer.
    Held,
    /// Moved to a device's printer queue (once, to one device).
    Released {
        device_id: crate::DeviceId,
        at: crate::UnixMillis,
    },
    /// Not released before its expiry.
    Expired { at: crate::UnixMillis },
}

/// `h/{job_id}`: a job in a user's virtual printer. Released, it becomes the job of the same id
/// in the device's queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeldJobRecord {
    pub job_id: crate::JobId,
    pub user_id: crate::UserId,
    /// A name for the panel's list.
    pub title: String,
    pub content_type: String,
    pub payload_len: u64,
    #[serde(default)]
    pub print: Option<PrintSettings>,
    pub created_at: crate::UnixMillis,
    pub expires_at: crate::UnixMillis,
    pub state: HeldState,
}

/// A held job as a device lists it for the logged-in user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct HeldJobSummary {
    pub job_id: crate::JobId,
    pub title: String,
    #[serde(default)]
    pub print: Option<PrintSettings>,
    pub created_at: crate::UnixMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn simplex_mono() -> Capabilities {
        Capabilities {
            media_sizes: vec!["A4".into(), "Letter".into()],
            color: false,
            duplex: false,
            resolutions_dpi: vec![300, 600],
            finishing: vec![],
            max_copies: 99,
        }
    }

    #[test]
    fn counters_are_checked_for_tearing_and_going_back() {
        let c = |total, color, mono, a4| PageCounters {
            total,
            color,
            mono,
            per_media: [("A4".to_owned(), a4)].into(),
        };
        assert!(c(10, 4, 6, 10).is_consistent());
        assert!(!c(11, 4, 6, 10).is_consistent());
        assert!(!c(10, 4, 6, 9).is_consistent());
        assert_eq!(c(10, 4, 6, 10).went_backwards(&c(9, 4, 5, 9)), None);
        assert_eq!(
            c(10, 3, 7, 10).went_backwards(&c(9, 4, 5, 9)),
            Some("color went from 4 to 3".into())
        );
        let mut fewer = c(10, 4, 6, 10);
        fewer.per_media.clear();
        assert!(fewer.went_backwards(&c(10, 4, 6, 10)).is_some());
    }

    #[test]
    fn the_first_unsupported_setting_is_named() {
        let caps = simplex_mono();
        assert!(caps.validate().is_ok());
        let ok = PrintSettings {
            media_size: Some("A4".into()),
            duplex: Some(false),
            copies: Some(2),
            ..PrintSettings::default()
        };
        assert_eq!(ok.check(&caps), Ok(()));
        type Change = fn(&mut PrintSettings);
        let refused: [(&str, Change); 6] = [
            ("duplex", |s| s.duplex = Some(true)),
            ("color", |s| s.color = Some(true)),
            ("media_size", |s| s.media_size = Some("A3".into())),
            ("resolution_dpi", |s| s.resolution_dpi = Some(1200)),
            ("finishing", |s| s.finishing = vec!["staple".into()]),
            ("copies", |s| s.copies = Some(0)),
        ];
        for (setting, change) in refused {
            let mut settings = PrintSettings::default();
            change(&mut settings);
            assert_eq!(settings.check(&caps).unwrap_err().setting, setting);
        }
        let err = PrintSettings {
            duplex: Some(true),
            ..Default::default()
        }
        .check(&caps)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "duplex true is not supported (the printer offers simplex only)"
        );
    }
}
