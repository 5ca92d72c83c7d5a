// Package image builds and caches appliances: a Debian kernel taken from
// its package, and an initramfs written by our own code (package
// image/cpio) around busybox-static, the kernel modules the devices need
// and an /init script.
//
// # Cache layout
//
// Everything lives under one cache folder (DefaultCacheDir:
// $XDG_CACHE_HOME/collective or ~/.cache/collective); the host's /boot is
// never touched.
//
//	<cache>/kernel/<version>/                  dpkg-deb -x of linux-image-<version>
//	    boot/vmlinuz-<version>                 the bzImage (XZ payload, boot protocol 2.15)
//	    lib/modules/<version>/                 modules, modules.dep
//	    vmlinux                                the unpacked ELF (PVH note), made by us
//	    .complete                              written last: the folder is whole
//	<cache>/appliances/<id>/                   one appliance, id = SHA-256 of its inputs
//	    vmlinux, bzImage, initrd.gz, manifest.json
//
// Folders and files are made under a temporary name and renamed into
// place, so a crash or a concurrent build never leaves a half-written
// entry where a reader looks.
//
// # Security
//
// The kernel package comes from the host's apt sources (signed by Debian);
// the files in the cache are trusted as much as the user's home folder.
// The guest that runs the appliance is not trusted by the VMM, but nothing
// here reads anything the guest wrote.
package image
