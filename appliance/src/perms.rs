//! Owner, group and mode of the unix sockets the appliance creates (NBD listeners, the
//! control socket, vhost-user-blk sockets).
//!
//! A socket is bound, then given its mode and owner before its listener accepts, so
//! nobody connects in between with the process umask's permissions. The default is
//! 0600 and the appliance's own user: only that user (and root) may connect.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use config::SocketPerms;

/// Sets `path`'s mode, then its owner and group where configured; the error names
/// what could not be done (changing the owner needs CAP_CHOWN).
pub fn apply(path: &Path, perms: &SocketPerms) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(perms.mode)).map_err(|e| {
        io::Error::new(e.kind(), format!("cannot set mode {:#o} on the socket: {e}", perms.mode))
    })?;
    if perms.owner.is_none() && perms.group.is_none() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, perms.owner, perms.group).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "cannot give the socket owner {:?} and group {:?}: {e} (changing a socket's \
                 owner needs CAP_CHOWN; a group the appliance's user is in needs none)",
                perms.owner, perms.group
            ),
        )
    })
}
