// SPDX-License-Identifier: GPL-2.0
/*
 * vfud_dma - Linux driver for vfud's dma-engine, an example of a vendor driver prototyped
 * against a device model (register map: device-models/src/dma_engine.rs).
 *
 * The driver owns two coherent DMA buffers, SRC and DST. A job is written to the sysfs
 * attribute "job" of the PCI device and runs synchronously in that write:
 *
 *   echo "copy LEN SEED" > job   fill SRC with a pseudo-random pattern, device copies to DST
 *   echo "fill LEN BYTE" > job   device fills DST with BYTE
 *   echo "crc LEN SEED"  > job   fill SRC with the pattern, device computes its CRC32
 *
 * The device signals completion with an interrupt (MSI-X vector 0, else MSI, else INTx);
 * the driver then checks the result itself (DST contents, or the device's CRC against the
 * kernel's crc32), and the write fails with EIO on a device error or EILSEQ on a wrong
 * result. The read-only attribute "stats" shows the jobs, failures and interrupts, the
 * device's COMPLETIONS register (operations completed since its reset) and the last crc
 * job's CRC as device and driver computed it; "irq_info" the interrupt type and Linux IRQ.
 */

#include <linux/completion.h>
#include <linux/crc32.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/sizes.h>

#define DRV_NAME		"vfud_dma"

#define PCI_VENDOR_ID_VFUD	0x5646
#define PCI_DEVICE_ID_DMA_ENGINE	0x0001

/* BAR0 registers (32-bit) */
#define REG_ID			0x00
#define REG_VERSION		0x04
#define REG_CONTROL		0x08
#define REG_STATUS		0x0c
#define REG_SRC_LO		0x10
#define REG_SRC_HI		0x14
#define REG_DST_LO		0x18
#define REG_DST_HI		0x1c
#define REG_LEN			0x20
#define REG_OPCODE		0x24
#define REG_PATTERN		0x28
#define REG_DOORBELL		0x2c
#define REG_RESULT		0x30
#define REG_COMPLETIONS		0x34
#define REG_ERROR_CODE		0x38
#define REG_IRQ_VECTOR		0x3c

#define DMA_ENGINE_ID		0x4d444656	/* "VFDM" */
#define CONTROL_IRQ_ENABLE	BIT(0)
#define STATUS_DONE		BIT(0)
#define STATUS_ERROR		BIT(1)

#define OP_COPY			1
#define OP_FILL			2
#define OP_CRC32		3

#define VDMA_BUF_SIZE		SZ_64K
#define VDMA_JOB_TIMEOUT_MS	5000

#ifndef PCI_IRQ_INTX
#define PCI_IRQ_INTX		PCI_IRQ_LEGACY
#endif

static char *irq_mode = "auto";
module_param(irq_mode, charp, 0444);
MODULE_PARM_DESC(irq_mode,
		 "interrupt type: auto (MSI-X, then MSI, then INTx), msix, msi or intx");

enum vdma_kind { VDMA_COPY, VDMA_FILL, VDMA_CRC, VDMA_KINDS };

static const char * const vdma_kind_names[VDMA_KINDS] = { "copy", "fill", "crc" };

struct vdma {
	struct pci_dev *pdev;
	void __iomem *regs;
	int irq;
	const char *irq_type;

	struct mutex lock;		/* one job at a time */
	struct completion done;
	u32 status;			/* STATUS seen by the interrupt handler */

	void *src;
	void *dst;
	dma_addr_t src_dma;
	dma_addr_t dst_dma;

	/* statistics, under lock except the interrupt counters */
	u64 jobs[VDMA_KINDS];
	u64 failures;
	atomic64_t irqs;
	atomic64_t spurious;
	u32 device_crc;
	u32 driver_crc;
};

static u32 vdma_read(struct vdma *vd, u32 reg)
{
	return ioread32(vd->regs + reg);
}

static void vdma_write(struct vdma *vd, u32 reg, u32 val)
{
	iowrite32(val, vd->regs + reg);
}

/* Fill @buf with the xorshift32 sequence of @seed, one byte per step. */
static void vdma_pattern(u8 *buf, u32 len, u32 seed)
{
	u32 x = seed ? seed : 1;
	u32 i;

	for (i = 0; i < len; i++) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		buf[i] = x;
	}
}

static irqreturn_t vdma_irq(int irq, void *data)
{
	struct vdma *vd = data;
	u32 status = vdma_read(vd, REG_STATUS);

	/* With a shared INTx line the interrupt may belong to another device. */
	if (!(status & (STATUS_DONE | STATUS_ERROR))) {
		atomic64_inc(&vd->spurious);
		return IRQ_NONE;
	}
	vdma_write(vd, REG_STATUS, status & (STATUS_DONE | STATUS_ERROR));
	vd->status = status;
	atomic64_inc(&vd->irqs);
	complete(&vd->done);
	return IRQ_HANDLED;
}

/* Run one operation on the device and wait for its completion interrupt. */
static int vdma_submit(struct vdma *vd, u32 opcode, u32 len, u32 pattern)
{
	reinit_completion(&vd->done);
	vd->status = 0;
	vdma_write(vd, REG_LEN, len);
	vdma_write(vd, REG_OPCODE, opcode);
	vdma_write(vd, REG_PATTERN, pattern);
	vdma_write(vd, REG_DOORBELL, 1);

	if (!wait_for_completion_timeout(&vd->done,
					 msecs_to_jiffies(VDMA_JOB_TIMEOUT_MS))) {
		dev_err(&vd->pdev->dev, "job timed out (STATUS %#x)\n",
			vdma_read(vd, REG_STATUS));
		return -ETIMEDOUT;
	}
	if (vd->status & STATUS_ERROR) {
		dev_err(&vd->pdev->dev, "device error %d\n",
			(s32)vdma_read(vd, REG_ERROR_CODE));
		return -EIO;
	}
	return 0;
}

static int vdma_job(struct vdma *vd, enum vdma_kind kind, u32 len, u32 arg)
{
	struct device *dev = &vd->pdev->dev;
	u32 i;
	int ret;

	switch (kind) {
	case VDMA_COPY:
		vdma_pattern(vd->src, len, arg);
		memset(vd->dst, 0, len);
		ret = vdma_submit(vd, OP_COPY, len, 0);
		if (!ret && memcmp(vd->src, vd->dst, len)) {
			dev_err(dev, "copy of %u bytes: destination differs\n", len);
			ret = -EILSEQ;
		}
		break;
	case VDMA_FILL:
		memset(vd->dst, ~arg & 0xff, len);
		ret = vdma_submit(vd, OP_FILL, len, arg & 0xff);
		for (i = 0; !ret && i < len; i++) {
			if (((u8 *)vd->dst)[i] != (arg & 0xff)) {
				dev_err(dev, "fill of %u bytes: byte %u is %#x\n",
					len, i, ((u8 *)vd->dst)[i]);
				ret = -EILSEQ;
			}
		}
		break;
	case VDMA_CRC:
		vdma_pattern(vd->src, len, arg);
		ret = vdma_submit(vd, OP_CRC32, len, 0);
		if (ret)
			break;
		vd->device_crc = vdma_read(vd, REG_RESULT);
		vd->driver_crc = ~crc32_le(~0, vd->src, len);
		if (vd->device_crc != vd->driver_crc) {
			dev_err(dev, "crc of %u bytes: device %#010x, driver %#010x\n",
				len, vd->device_crc, vd->driver_crc);
			ret = -EILSEQ;
		}
		break;
	default:
		return -EINVAL;
	}
	vd->jobs[kind]++;
	if (ret)
		vd->failures++;
	return ret;
}

static ssize_t job_store(struct device *dev, struct device_attribute *attr,
			 const char *buf, size_t count)
{
	struct vdma *vd = dev_get_drvdata(dev);
	char name[8];
	u32 len, arg = 0;
	int kind, ret;

	if (sscanf(buf, "%7s %u %u", name, &len, &arg) < 2)
		return -EINVAL;
	kind = match_string(vdma_kind_names, VDMA_KINDS, name);
	if (kind < 0 || len == 0 || len > VDMA_BUF_SIZE)
		return -EINVAL;

	mutex_lock(&vd->lock);
	ret = vdma_job(vd, kind, len, arg);
	mutex_unlock(&vd->lock);
	return ret ? ret : count;
}
static DEVICE_ATTR_WO(job);

static ssize_t stats_show(struct device *dev, struct device_attribute *attr,
			  char *buf)
{
	struct vdma *vd = dev_get_drvdata(dev);
	ssize_t n;

	mutex_lock(&vd->lock);
	n = sysfs_emit(buf,
		       "copy=%llu fill=%llu crc=%llu failures=%llu irqs=%lld spurious=%lld completions=%u device_crc=%#010x driver_crc=%#010x\n",
		       vd->jobs[VDMA_COPY], vd->jobs[VDMA_FILL],
		       vd->jobs[VDMA_CRC], vd->failures,
		       atomic64_read(&vd->irqs), atomic64_read(&vd->spurious),
		       vdma_read(vd, REG_COMPLETIONS),
		       vd->device_crc, vd->driver_crc);
	mutex_unlock(&vd->lock);
	return n;
}
static DEVICE_ATTR_RO(stats);

static ssize_t irq_info_show(struct device *dev, struct device_attribute *attr,
			char *buf)
{
	struct vdma *vd = dev_get_drvdata(dev);

	return sysfs_emit(buf, "%s %d\n", vd->irq_type, vd->irq);
}
static DEVICE_ATTR_RO(irq_info);

static struct attribute *vdma_attrs[] = {
	&dev_attr_job.attr,
	&dev_attr_stats.attr,
	&dev_attr_irq_info.attr,
	NULL,
};
ATTRIBUTE_GROUPS(vdma);

static int vdma_setup_irq(struct vdma *vd)
{
	struct pci_dev *pdev = vd->pdev;
	unsigned int types;
	int ret;

	if (!strcmp(irq_mode, "auto"))
		types = PCI_IRQ_MSIX | PCI_IRQ_MSI | PCI_IRQ_INTX;
	else if (!strcmp(irq_mode, "msix"))
		types = PCI_IRQ_MSIX;
	else if (!strcmp(irq_mode, "msi"))
		types = PCI_IRQ_MSI;
	else if (!strcmp(irq_mode, "intx"))
		types = PCI_IRQ_INTX;
	else
		return dev_err_probe(&pdev->dev, -EINVAL,
				     "irq_mode=%s: not auto, msix, msi or intx\n",
				     irq_mode);

	/* One vector: the device raises IRQ_VECTOR (0) on every completion. */
	ret = pci_alloc_irq_vectors(pdev, 1, 1, types);
	if (ret < 0)
		return dev_err_probe(&pdev->dev, ret, "no interrupt (irq_mode=%s)\n",
				     irq_mode);
	vd->irq = pci_irq_vector(pdev, 0);
	vd->irq_type = pdev->msix_enabled ? "msix" :
		       pdev->msi_enabled ? "msi" : "intx";

	/* Vectors are released by pcim; the handler goes first (devres is LIFO). */
	return devm_request_irq(&pdev->dev, vd->irq, vdma_irq,
				pdev->msix_enabled || pdev->msi_enabled ?
				0 : IRQF_SHARED,
				DRV_NAME, vd);
}

static int vdma_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct device *dev = &pdev->dev;
	struct vdma *vd;
	u32 ident;
	int ret;

	vd = devm_kzalloc(dev, sizeof(*vd), GFP_KERNEL);
	if (!vd)
		return -ENOMEM;
	vd->pdev = pdev;
	mutex_init(&vd->lock);
	init_completion(&vd->done);

	ret = pcim_enable_device(pdev);
	if (ret)
		return dev_err_probe(dev, ret, "cannot enable device\n");
	ret = pcim_iomap_regions(pdev, BIT(0), DRV_NAME);
	if (ret)
		return dev_err_probe(dev, ret, "cannot map BAR0\n");
	vd->regs = pcim_iomap_table(pdev)[0];

	ident = vdma_read(vd, REG_ID);
	if (ident != DMA_ENGINE_ID)
		return dev_err_probe(dev, -ENODEV, "unexpected ID %#x\n", ident);

	ret = dma_set_mask_and_coherent(dev, DMA_BIT_MASK(64));
	if (ret)
		return dev_err_probe(dev, ret, "no usable DMA mask\n");
	pci_set_master(pdev);

	vd->src = dmam_alloc_coherent(dev, VDMA_BUF_SIZE, &vd->src_dma, GFP_KERNEL);
	vd->dst = dmam_alloc_coherent(dev, VDMA_BUF_SIZE, &vd->dst_dma, GFP_KERNEL);
	if (!vd->src || !vd->dst)
		return -ENOMEM;

	ret = vdma_setup_irq(vd);
	if (ret)
		return ret;

	/* The buffers never move: program them and the interrupt once. */
	vdma_write(vd, REG_SRC_LO, lower_32_bits(vd->src_dma));
	vdma_write(vd, REG_SRC_HI, upper_32_bits(vd->src_dma));
	vdma_write(vd, REG_DST_LO, lower_32_bits(vd->dst_dma));
	vdma_write(vd, REG_DST_HI, upper_32_bits(vd->dst_dma));
	vdma_write(vd, REG_IRQ_VECTOR, 0);
	vdma_write(vd, REG_STATUS, STATUS_DONE | STATUS_ERROR);
	vdma_write(vd, REG_CONTROL, CONTROL_IRQ_ENABLE);

	pci_set_drvdata(pdev, vd);
	dev_info(dev, "dma-engine version %#x, %s interrupt (irq %d)\n",
		 vdma_read(vd, REG_VERSION), vd->irq_type, vd->irq);
	return 0;
}

static void vdma_remove(struct pci_dev *pdev)
{
	struct vdma *vd = pci_get_drvdata(pdev);

	/*
	 * The sysfs attributes are gone and no job runs; silence the device before devres
	 * frees the interrupt, the buffers and the mapping, and disables the device.
	 */
	vdma_write(vd, REG_CONTROL, 0);
	dev_info(&pdev->dev, "removed after %llu copy, %llu fill, %llu crc jobs\n",
		 vd->jobs[VDMA_COPY], vd->jobs[VDMA_FILL], vd->jobs[VDMA_CRC]);
}

static const struct pci_device_id vdma_ids[] = {
	{ PCI_DEVICE(PCI_VENDOR_ID_VFUD, PCI_DEVICE_ID_DMA_ENGINE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vdma_ids);

static struct pci_driver vdma_driver = {
	.name		= DRV_NAME,
	.id_table	= vdma_ids,
	.probe		= vdma_probe,
	.remove		= vdma_remove,
	.dev_groups	= vdma_groups,
};
module_pci_driver(vdma_driver);

MODULE_DESCRIPTION("Example driver for vfud's dma-engine");
MODULE_LICENSE("GPL");
